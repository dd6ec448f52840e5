"""SimMIM masked-modelling pretraining in JAX/Flax."""
import os as _os

from simmim_jax import cluster as _cluster

# An installed libtpu (the aot extra) would print a screen of warnings on a host without TPUs at the first device.
_cluster.quiet_libtpu_without_tpu(_os.environ, _cluster.tpu_chips_present())
