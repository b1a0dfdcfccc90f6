"""The package's import graph: no cycles, and imports run one way (commands -> jobs -> blocks).

The graph is read from the source with `ast` (nothing is imported), counting imports inside
functions too: a function-level import hides a dependency, it does not remove it.
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'mr2ct_jax'
# What `python -m ...` runs: nothing in the package may import these.
COMMANDS = {
    'mr2ct_jax.main', 'mr2ct_jax.translate', 'mr2ct_jax.export', 'mr2ct_jax.evaluate',
    'mr2ct_jax.data.prepare', 'mr2ct_jax.data.phantom.__main__',
    'mr2ct_jax.segmentation.__main__', 'mr2ct_jax.bench.__main__', 'mr2ct_jax.bench.train',
    'mr2ct_jax.bench.pipeline', 'mr2ct_jax.bench.torch_reference',
    'mr2ct_jax.segmentation.baseline',
    'mr2ct_jax.experiments.paper', 'mr2ct_jax.experiments.supervised',
    'mr2ct_jax.bench.translate',
}
# The study runs whole jobs (train, evaluate, segment) the way the commands do: it sits beside
# the commands, above the jobs, and no job or block imports it.
STUDY = 'mr2ct_jax.experiments'
# The building blocks, from the bottom up: a block may import blocks of its own or a lower
# rank, never a higher one and never a job (training, inference, evaluation, segmentation).
BLOCK_RANKS = {
    'mr2ct_jax.atomic': 0, 'mr2ct_jax.models.options': 0,
    'mr2ct_jax.config_checks': 1, 'mr2ct_jax.cli': 1, 'mr2ct_jax.models': 1,
    'mr2ct_jax.data': 2,
    'mr2ct_jax.parallel': 3, 'mr2ct_jax.checkpointing': 3, 'mr2ct_jax.tb_logging': 3,
}
JOBS = ('mr2ct_jax.training', 'mr2ct_jax.inference', 'mr2ct_jax.evaluation',
        'mr2ct_jax.segmentation')


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def _imports(path: pathlib.Path, known: set[str]) -> list[tuple[str, int, bool]]:
  """(imported mr2ct_jax module, line, inside a function) for every import in `path`."""
  tree = ast.parse(path.read_text(encoding='utf-8'))
  found = []

  def visit(node: ast.AST, in_function: bool) -> None:
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      if isinstance(child, ast.Import):
        for alias in child.names:
          if alias.name.startswith('mr2ct_jax'):
            found.append((alias.name, child.lineno, in_function))
      elif isinstance(child, ast.ImportFrom) and (child.module or '').startswith('mr2ct_jax'):
        for alias in child.names:
          full = f'{child.module}.{alias.name}'
          found.append((full if full in known else child.module, child.lineno, in_function))
      visit(child, nested)

  visit(tree, False)
  return found


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: {target for target, _, _ in _imports(path, set(modules))}
          for name, path in modules.items()}


def _rank(module: str) -> int | None:
  """The block rank of `module` (its longest listed prefix), None for jobs and commands."""
  best = None
  for prefix, rank in BLOCK_RANKS.items():
    if module == prefix or module.startswith(prefix + '.'):
      if best is None or len(prefix) > len(best[0]):
        best = (prefix, rank)
  return None if best is None or module in COMMANDS else best[1]


def _is_job(module: str) -> bool:
  return any(module == job or module.startswith(job + '.') for job in JOBS)


def test_every_command_module_exists():
  assert COMMANDS <= set(_modules())


def test_no_import_cycle():
  graph = _graph()
  state: dict[str, int] = {}  # 1: on the current path, 2: done

  def visit(module: str, path: list[str]) -> None:
    state[module] = 1
    for target in sorted(graph.get(module, ())):
      if state.get(target) == 1:
        cycle = path[path.index(target):] + [target] if target in path else [module, target]
        pytest.fail('import cycle: ' + ' -> '.join(cycle))
      if target in graph and state.get(target) is None:
        visit(target, path + [target])
    state[module] = 2

  for module in sorted(graph):
    if state.get(module) is None:
      visit(module, [module])


def test_nothing_imports_a_command():
  for module, targets in _graph().items():
    imported = sorted(targets & COMMANDS)
    # The study calls the baseline's, the compare's and the export's functions, as a user's
    # script would.
    if module.startswith(STUDY + '.'):
      imported = [t for t in imported if not t.startswith('mr2ct_jax.segmentation.')
                  and t != 'mr2ct_jax.export']
    assert not imported, f'{module} imports the command(s) {imported}'


def test_only_the_study_imports_the_study():
  for module, targets in _graph().items():
    if not module.startswith(STUDY):
      assert not any(t.startswith(STUDY) for t in targets), f'{module} imports the study'


def test_blocks_import_no_job_and_no_higher_block():
  for module, targets in _graph().items():
    rank = _rank(module)
    if rank is None:
      continue
    for target in targets:
      assert not _is_job(target), f'building block {module} imports the job {target}'
      target_rank = _rank(target)
      assert target_rank is None or target_rank <= rank, (
          f'{module} (rank {rank}) imports the higher block {target} (rank {target_rank})')


def test_only_commands_import_the_training_loop_and_trainers_stay_apart():
  for module, targets in _graph().items():
    if 'mr2ct_jax.training.loop' in targets:
      assert module in COMMANDS or module.startswith(STUDY + '.'), (
          f'{module} imports the training loop')
    if module.startswith('mr2ct_jax.segmentation'):
      assert not {t for t in targets if t.startswith('mr2ct_jax.training.')} - {
          'mr2ct_jax.training.state'}, f'{module} reaches into the CycleGAN trainer'
    if module.startswith('mr2ct_jax.training'):
      assert not any(t.startswith('mr2ct_jax.segmentation') for t in targets), module


def test_function_level_imports_say_why():
  """An import inside a function is there for a user (start-up time, JAX-free paths, optional
  dependencies): a comment on the line or just above must say so."""
  for name, path in _modules().items():
    lines = path.read_text(encoding='utf-8').splitlines()
    tree = ast.parse('\n'.join(lines))
    for func in ast.walk(tree):
      if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for node in ast.walk(func):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
          continue
        line = lines[node.lineno - 1]
        own = line.split('#', 1)[1] if '#' in line else ''
        own = own.replace('pylint: disable=g-import-not-at-top', '').strip(' ,')
        # A comment just above the block of imports this one belongs to.
        first = node.lineno - 1
        while first > 0 and lines[first - 1].strip().startswith(('import ', 'from ')):
          first -= 1
        above = [lines[i].strip() for i in range(max(0, first - 3), first)]
        explained = bool(own) or any(text.startswith('#') for text in above)
        assert explained, f'{path}:{node.lineno}: function-level import without a reason'


def test_no_file_over_400_lines():
  for path in sorted(PACKAGE.rglob('*.py')):
    count = len(path.read_text(encoding='utf-8').splitlines())
    assert count <= 400, f'{os.path.relpath(path, PACKAGE.parent)}: {count} lines'


def test_the_graph_sees_real_imports():
  """The checks above would pass on an empty graph: make sure it holds known edges."""
  graph = _graph()
  assert 'mr2ct_jax.training.step' in graph['mr2ct_jax.training.loop']
  assert 'mr2ct_jax.inference.slices' in graph['mr2ct_jax.evaluation.scoring']
  assert 'mr2ct_jax.training.loop' in graph['mr2ct_jax.main']  # a function-level import
  assert _rank('mr2ct_jax.data.phantom.cohort') == 2 and _rank('mr2ct_jax.main') is None


def test_commands_that_need_no_jax_start_without_it():
  """--help, flag errors, `evaluate --compare` and `prepare` must not wait for JAX to load."""
  code = ('import sys\n'
          'import mr2ct_jax.evaluate, mr2ct_jax.translate, mr2ct_jax.data.prepare\n'
          'import mr2ct_jax.inference.numpy_generator\n'
          'loaded = sorted(m for m in ("jax", "flax", "optax", "orbax") if m in sys.modules)\n'
          'assert not loaded, loaded\n')
  subprocess.run([sys.executable, '-c', code], check=True, timeout=120,
                 cwd=str(PACKAGE.parent))
