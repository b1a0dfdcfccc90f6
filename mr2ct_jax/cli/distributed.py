"""Multi-process start-up shared by the trainers' commands: --jax_distributed and its flags.

`jax.distributed.initialize()` finds the process count and index by itself on TPU pods, under
SLURM, Open MPI and Kubernetes; elsewhere (several GPU hosts started by hand, or processes on
one machine) they are given with --coordinator_address, --num_processes and --process_id.
JAX itself reads only JAX_COORDINATOR_ADDRESS from the environment, so the flags are how
`launch/multi_gpu.sh` passes the other two.
"""

from absl import flags


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Defines --jax_distributed, --coordinator_address, --num_processes, --process_id."""
  flags.DEFINE_bool('jax_distributed', False, 'Call jax.distributed.initialize() first '
                    '(several processes: TPU pod, GPU hosts, SLURM).', flag_values=fv)
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (default: '
                      'detected, or $JAX_COORDINATOR_ADDRESS).', flag_values=fv)
  flags.DEFINE_integer('num_processes', None, 'Number of processes (default: detected).',
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer('process_id', None, 'This process\'s index (default: detected).',
                       lower_bound=0, flag_values=fv)


def initialize(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Calls `jax.distributed.initialize` when --jax_distributed (flags left unset: detected).

  Raises:
    SystemExit: --coordinator_address/--num_processes/--process_id without --jax_distributed.
  """
  given = [name for name in ('coordinator_address', 'num_processes', 'process_id')
           if fv[name].value is not None]
  if not fv.jax_distributed:
    if given:
      raise SystemExit(f'error: --{given[0]} needs --jax_distributed')
    return
  # Imported here: the commands parse their flags (and re-exec for huge pages) before JAX.
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(coordinator_address=fv.coordinator_address,
                             num_processes=fv.num_processes, process_id=fv.process_id)
