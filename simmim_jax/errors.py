"""The error a user can fix (a config value, a path, a full disk): main prints its message alone, one line."""


class UserError(Exception):
  """A problem with the user's input or environment; its message says what to change."""
