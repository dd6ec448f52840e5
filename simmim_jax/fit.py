"""Searches over compiles (simmim_jax/aot.py): the largest per-device batch that fits, and a way to run a recipe's
global batch on a target (gradient accumulation, then rematerialisation) that fits."""
import dataclasses
import re
from collections.abc import Callable, Iterator

import ml_collections

from simmim_jax import aot, config_io

Compile = Callable[[ml_collections.ConfigDict], aot.Program]
# The refusal names the temporaries' need: "... required for HLO temporaries (32.00G) exceeds available HBM".
_REQUIRED = re.compile(r'required[^(]*\(([\d.]+)([KMGT])\)')
_UNITS = {'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def need(program: aot.Program, fixed: int | None) -> float | None:
  """Bytes the program needs per device: its total when compiled; for a refusal the temporaries it names plus
  `fixed` (arguments + outputs - alias of a compiled neighbour), or None when unknown."""
  if program.failed:
    return None
  if not program.refused:
    return float(program.total)
  match = _REQUIRED.search(program.refused)
  if match is None or fixed is None:
    return None
  return float(match.group(1)) * _UNITS[match.group(2)] + fixed


@dataclasses.dataclass
class BatchSearch:
  """The compiles of one search: `best` fits at `batch`, `next_up` (batch + multiple) does not."""
  remat: str
  batch: int  # per device; 0 when not even `multiple` fits
  best: aot.Program | None
  next_up: aot.Program | None
  probes: list[aot.Program]


def with_batch(config: ml_collections.ConfigDict, devices: int, per_device: int, **fields) -> ml_collections.ConfigDict:
  """A copy with batch_size = per_device x devices and the given fields ('model.remat': ...) set."""
  return config_io.apply_overrides(ml_collections.ConfigDict(config.to_dict()),
                                   {'batch_size': per_device * devices, **fields})


def find_batch(config: ml_collections.ConfigDict, devices: int, compile_fn: Compile, *, remat: str, start: int,
               multiple: int = 8, limit: int = 65_536) -> BatchSearch:
  """The largest per-device batch (a multiple of `multiple`, no accumulation) whose step fits, by bracketing from
  `start` (doubling or halving) and then bisection; each probe is a compile. A probe's guess is the linear
  interpolation of the need between the bracket's ends where both are known (memory grows ~linearly with the
  batch), kept strictly inside the bracket, so it never takes more compiles than plain bisection."""
  fields = {'model.remat': remat, 'optim.accum_steps': 1}
  probes: dict[int, aot.Program] = {}

  def probe(b: int) -> aot.Program:
    if b not in probes:
      probes[b] = compile_fn(with_batch(config, devices, b, **fields))
    return probes[b]

  b = max(multiple, start // multiple * multiple)
  if probe(b).fits:  # bracket upwards: double until a batch does not fit
    lo = b
    while True:
      if lo * 2 > limit:
        return BatchSearch(remat, lo, probes[lo], None, list(probes.values()))
      if not probe(lo * 2).fits:
        hi = lo * 2
        break
      lo *= 2
  else:  # downwards: halve until one fits
    hi = b
    while True:
      if hi <= multiple:
        return BatchSearch(remat, 0, None, probes[hi], list(probes.values()))
      candidate = max(multiple, hi // 2 // multiple * multiple)
      if probe(candidate).fits:
        lo = candidate
        break
      hi = candidate
  while hi - lo > multiple:
    b = _guess(probes[lo], probes[hi], lo, hi, multiple)
    if probe(b).fits:
      lo = b
    else:
      hi = b
  return BatchSearch(remat, lo, probes[lo], probe(lo + multiple), list(probes.values()))


def _guess(low: aot.Program, high: aot.Program, lo: int, hi: int, multiple: int) -> int:
  """The next probe strictly between lo and hi, on the `multiple` grid."""
  fixed = low.arguments + low.outputs - low.alias
  n_lo, n_hi = need(low, fixed), need(high, fixed)
  b = (lo + hi) // 2
  if n_lo is not None and n_hi is not None and n_hi > n_lo:
    b = int(lo + (low.hbm_bytes - n_lo) * (hi - lo) / (n_hi - n_lo))
  return min(max(b // multiple * multiple, lo + multiple), hi - multiple)


def accumulation_ladder(per_device: int) -> Iterator[int]:
  """1, 2, 4, ... while the micro-batch per device stays a whole number."""
  accum = 1
  while accum <= per_device and per_device % accum == 0:
    yield accum
    accum *= 2


@dataclasses.dataclass
class Plan:
  """How the config's global batch runs on the target: the first of (accumulation, remat) that compiles and fits."""
  program: aot.Program | None  # None: nothing tried fits
  tried: list[aot.Program]


def plan(config: ml_collections.ConfigDict, devices: int, compile_fn: Compile, *, step: str,
         remats: tuple[str, ...] = ('none', 'block'), max_micro: dict[str, int] | None = None) -> Plan:
  """Keeps the global batch and tries, for each remat in order, accumulation 1, 2, 4, ... (pretraining only:
  the fine-tuning trainer does not accumulate). Accumulation comes first: it costs no FLOPs, remat ~1/3 more.
  max_micro (remat -> the largest per-device batch known to fit, from find_batch) skips what cannot fit."""
  per_device = config.batch_size // devices
  tried = []
  for remat in remats:
    for accum in (accumulation_ladder(per_device) if step == 'pretrain' else (1,)):
      micro = per_device // accum
      if max_micro and remat in max_micro and micro > max_micro[remat]:
        continue
      program = compile_fn(config_io.apply_overrides(ml_collections.ConfigDict(config.to_dict()),
                                                     {'model.remat': remat, 'optim.accum_steps': accum}))
      tried.append(program)
      if program.fits:
        return Plan(program, tried)
  return Plan(None, tried)
