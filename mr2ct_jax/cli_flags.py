"""Flag parsing for the user-facing commands (translate, export) without global flag state.

Each command defines its flags on a private `absl.flags.FlagValues`, so the modules can be
imported together (tests, train.py calling evaluate) without duplicate-flag errors, and
`main(argv)` can be called from Python. Errors exit with one line, as every command does.
"""

from typing import Sequence

from absl import flags


def parse(fv: flags.FlagValues, argv: Sequence[str], command: str,
          required: Sequence[str] = ()) -> None:
  """Parses `argv` (argv[0] is the program) into `fv`.

  Args:
    fv: the command's flags.
    argv: command line, program name first.
    command: module name for the usage line, e.g. 'mr2ct_jax.export'.
    required: flags that must be given.

  Raises:
    SystemExit: 0 after printing help for -h/--help; otherwise 'error: ...' (one line) for an
      unknown/bad flag, a positional argument or a missing required flag.
  """
  if any(arg in ('-h', '--help', '-help', '--helpfull') for arg in argv[1:]):
    print(f'usage: python -m {command} [flags]\n\n{fv.get_help()}')
    raise SystemExit(0)
  try:
    rest = fv(list(argv))
  except flags.Error as e:
    raise SystemExit(f'error: {str(e).splitlines()[0]}') from e
  if len(rest) > 1:
    raise SystemExit(f'error: unexpected arguments {rest[1:]} (flags are --name=value)')
  for name in required:
    if fv[name].value is None:
      raise SystemExit(f'error: --{name} is required (see --help)')
