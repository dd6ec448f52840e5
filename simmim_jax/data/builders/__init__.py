"""tfds builders for real data that ships inside installable packages, prepared offline."""
