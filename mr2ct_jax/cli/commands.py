"""The shared shape of the user-facing commands: parse private flags, run, one-line errors.

Each command (prepare, translate, export, evaluate, segmentation, the benchmarks) defines its
flags on a private `absl.flags.FlagValues`, so the modules can be imported together (tests,
a notebook) without duplicate-flag errors, and `main(argv)` can be called from
Python. `run` is the whole `main`: help, parsing, the command, and errors as one line
('error: ...', exit status 1) instead of a traceback. Every command reports an unusable
output (`atomic.OutputError`) and a failed file operation (OSError) that way too.
"""

import ast
import contextlib
import os
import signal
import sys
import threading
import traceback
import types
from collections.abc import Callable, Iterator, Sequence

from absl import flags

from mr2ct_jax import atomic

# Exit status of a command that stopped before its work was done and should simply be run
# again (EX_TEMPFAIL, so job schedulers requeue it): training stopped by a signal after its
# checkpoint, a study cell waiting for one it needs.
EXIT_NOT_FINISHED = 75

HELP_ARGS = ('-h', '--help', '-help', '--helpfull')
# Exception types whose message is a one-line explanation for the user, or a function giving
# them (called only after a failure, so a command need not import heavy modules to name them).
ErrorTypes = tuple[type[BaseException], ...] | Callable[[], tuple[type[BaseException], ...]]


def default_config_path() -> str:
  """`configs/gc.py` of this checkout: the default --config of prepare and the benchmarks."""
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.join(os.path.dirname(package), 'configs', 'gc.py')


def wants_help(argv: Sequence[str]) -> bool:
  """Whether the command line (program name first) asks for help."""
  return any(arg in HELP_ARGS for arg in argv[1:])


def help_text(fv: flags.FlagValues, command: str, doc: str | None = None) -> str:
  """The command's docstring (or a usage line) followed by its flags."""
  if doc:
    return f'{doc}\nflags:\n{fv.get_help()}'
  return f'usage: python -m {command} [flags]\n\n{fv.get_help()}'


def last_line(error: BaseException) -> str:
  """The last non-empty line of an error (config-file errors carry the loader's traceback)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def config_error(error: BaseException, argv: Sequence[str]) -> str:
  """A one-line message for a --config file that does not load or an unknown override key.

  ml_collections reports an override of a field the config lacks (--config.data.nonexist=1)
  as a KeyError/AttributeError naming only the field, and a config file that fails to load
  lazily, as an OSError on first use; both carry tracebacks in their text.
  """
  raw = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
  # ml_collections wraps a KeyError's repr in its AttributeError: unquote it.
  if raw[:1] in ('"', "'") and raw[-1:] == raw[:1]:
    try:
      raw = str(ast.literal_eval(raw))
    except (ValueError, SyntaxError):
      pass
  lines = raw.strip().splitlines() or ['']
  field = lines[0].strip('"\'')
  if isinstance(error, (KeyError, AttributeError)) and field.isidentifier():
    names = [arg.split('=')[0] for arg in argv[1:] if arg.startswith('--config.')]
    suspects = [name for name in names if field in name.split('.')[1:]] or ['--config']
    hint = next((f' ({line.strip().rstrip("?")}?)' for line in lines[1:]
                 if line.strip().startswith('Did you mean')), '')
    return f'{" or ".join(suspects)}: the config has no field {field!r}{hint}'
  if isinstance(error, OSError):  # the loader's own report, already naming the exception
    return f'--config: {last_line(error)}'
  return f'--config: {type(error).__name__}: {last_line(error)}'


def load_config_flag(fv: flags.FlagValues, argv: Sequence[str]) -> None:
  """Loads a --config flag now, so a bad config file fails at parse time with one line."""
  if 'config' not in fv or fv['config'].value is None:
    return
  try:
    getattr(fv['config'].value, 'to_dict')
  except Exception as e:  # pylint: disable=broad-except  (any error of the user's config file)
    raise SystemExit(f'error: {config_error(e, argv)}') from e


def flag_error(error: flags.Error) -> str:
  """The one line of a flag-parsing error (absl's text holds a usage hint after it)."""
  if 'config file' in str(error):
    return f'--config: {last_line(error)}'
  return str(error).splitlines()[0]


def parse(fv: flags.FlagValues, argv: Sequence[str] | None, command: str,
          required: Sequence[str] = (), *, positional: bool = False,
          doc: str | None = None) -> list[str]:
  """Parses `argv` (argv[0] is the program; None: sys.argv) into `fv`.

  Args:
    fv: the command's flags.
    argv: command line, program name first.
    command: module name for the usage line, e.g. 'mr2ct_jax.export'.
    required: flags that must be given.
    positional: accept positional arguments (otherwise they are an error).
    doc: text printed before the flags for -h/--help (default: a usage line).

  Returns:
    The positional arguments (empty unless `positional`).

  Raises:
    SystemExit: 0 after printing help for -h/--help; otherwise 'error: ...' (one line) for an
      unknown/bad flag or config file, an unexpected positional argument or a missing
      required flag.
  """
  argv = list(sys.argv if argv is None else argv)
  if wants_help(argv):
    print(help_text(fv, command, doc))
    raise SystemExit(0)
  try:
    rest = fv(argv)
  except flags.Error as e:
    raise SystemExit(f'error: {flag_error(e)}') from e
  except Exception as e:  # pylint: disable=broad-except
    # Only a --config flag runs user code while parsing: its file failed to load, or an
    # override names a field the config lacks.
    raise SystemExit(f'error: {config_error(e, argv)}') from e
  load_config_flag(fv, argv)
  if len(rest) > 1 and not positional:
    raise SystemExit(f'error: unexpected arguments {rest[1:]} (flags are --name=value)')
  for name in required:
    if fv[name].value is None:
      raise SystemExit(f'error: --{name} is required (see --help)')
    if isinstance(fv[name].value, str) and not fv[name].value.strip():
      raise SystemExit(f'error: --{name} is empty; it needs a value (see --help)')
  return rest[1:]


def os_error_line(error: OSError) -> str:
  """'PATH: reason' of a failed file operation (str(OSError) is '[Errno 13] ...: 'PATH'')."""
  reason = error.strerror or str(error)
  return f'{error.filename}: {reason}' if error.filename is not None else reason


@contextlib.contextmanager
def one_line_errors(errors: ErrorTypes, verbose: bool = False) -> Iterator[None]:
  """Turns the listed exceptions raised in the block into SystemExit('error: MESSAGE').

  `atomic.OutputError` is always listed. An OSError that is not listed becomes
  'error: PATH: reason' (a disk that fills up or a folder that vanishes mid-run is the
  user's problem to fix, not a bug to debug from a traceback). An exception with an
  `exit_status` attribute (a trainer stopped by a signal, `mr2ct_jax.preemption`) prints its
  message and exits with that status. With `verbose` the traceback is printed first.
  """
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless listed)
    status = getattr(e, 'exit_status', None)
    listed = isinstance(e, (errors() if callable(errors) else errors) + (atomic.OutputError,))
    if verbose and (status is not None or listed or isinstance(e, OSError)):
      traceback.print_exc()
    if status is not None:
      print(e, file=sys.stderr, flush=True)
      raise SystemExit(status) from e
    if listed:
      raise SystemExit(f'error: {e}') from e
    if isinstance(e, OSError):
      raise SystemExit(f'error: {os_error_line(e)}') from e
    raise


class Terminated(SystemExit):
  """SIGTERM, raised in the main thread so that `finally` blocks (the temporary outputs of
  `mr2ct_jax.atomic`) clean up before the process exits with the usual status 143."""


def _note_repeat(signum: int, frame: types.FrameType | None) -> None:
  """A second SIGTERM while the first unwinds: let the cleanup finish."""
  del signum, frame


def _raise_terminated(signum: int, frame: types.FrameType | None) -> None:
  """The SIGTERM handler of `terminate_unwinds`: one line, then `Terminated`."""
  del frame
  # A second signal must not interrupt the `finally` blocks that remove temporary outputs.
  signal.signal(signum, _note_repeat)
  try:
    # os.write, not print: the signal may interrupt a write to sys.stderr in progress.
    os.write(2, f'{signal.Signals(signum).name}: stopping; no partial output is kept\n'
             .encode())
  except OSError:  # no stderr: still stop (an OSError here could be caught as a bad file)
    pass
  raise Terminated(128 + signum)


@contextlib.contextmanager
def terminate_unwinds() -> Iterator[None]:
  """Within the block SIGTERM raises `Terminated` instead of killing the process outright.

  Python's default SIGTERM ends the process without running `finally` blocks, which would
  leave the hidden temporary folders of `atomic` behind (SIGINT already raises
  KeyboardInterrupt). A handler someone else installed is left alone, and so is a process
  outside the main thread; the trainers' own handler (`mr2ct_jax.preemption`) takes over
  while they run and restores this one after.
  """
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
    yield
    return
  signal.signal(signal.SIGTERM, _raise_terminated)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run(fv: flags.FlagValues, argv: Sequence[str] | None, command: str,
        body: Callable[..., object], *, errors: ErrorTypes, required: Sequence[str] = (),
        positional: bool = False, doc: str | None = None) -> int:
  """A command's `main`: help, flag parsing, `body`, one-line errors.

  Args:
    fv: the command's flags (see `parse`).
    argv: command line, program name first (None: sys.argv).
    command: module name, e.g. 'mr2ct_jax.export'.
    body: runs the command once the flags are parsed: `body()`, or `body(args)` with the
      positional arguments when `positional`.
    errors: exception types reported as one line (see `ErrorTypes`).
    required: flags that must be given.
    positional: accept positional arguments and pass them to `body`.
    doc: printed with the flags for -h/--help (usually the module docstring).

  Returns:
    0 (also after printing help).

  Raises:
    SystemExit: 'error: ...' (one line) for bad flags or a listed error.
  """
  argv = list(sys.argv if argv is None else argv)
  if 'verbose' not in fv:
    flags.DEFINE_bool('verbose', False, 'On an error, print its traceback too (for a bug '
                      'report).', flag_values=fv)
  if wants_help(argv):
    print(help_text(fv, command, doc))
    return 0
  args = parse(fv, argv, command, required, positional=positional)
  with terminate_unwinds(), one_line_errors(errors, verbose=fv.verbose):
    if positional:
      body(args)
    else:
      body()
  return 0


def define_generator_source_flags(fv: flags.FlagValues) -> None:
  """--workdir / --npz (where the generator comes from), --step and --backend."""
  flags.DEFINE_string('workdir', None, 'Training workdir (latest checkpoint or --step).',
                      flag_values=fv)
  flags.DEFINE_string('npz', None, 'Exported generator .npz (instead of --workdir).',
                      flag_values=fv)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).', flag_values=fv)
  flags.DEFINE_enum('backend', 'jax', ['jax', 'numpy'], 'Generator forward implementation.',
                    flag_values=fv)


def generator_source(fv: flags.FlagValues, alternative: str = '') -> str:
  """The --workdir or --npz given (exactly one must be).

  Args:
    fv: flags defined by `define_generator_source_flags`, parsed.
    alternative: added to the error, e.g. ' (or --compare A B)'.

  Raises:
    SystemExit: 'error: give exactly one of --workdir or --npz...'.
  """
  if (fv.workdir is None) == (fv.npz is None):
    raise SystemExit(f'error: give exactly one of --workdir or --npz{alternative}')
  return fv.workdir if fv.workdir is not None else fv.npz
