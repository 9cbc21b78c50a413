"""The package's shape: imports point one way (layers <- models / data <- codecs <- tasks <- cli / integrations /
bench), no import cycle (imports inside functions count), no task names a model family, and the repository cites
nothing outside itself. Read from the source with `ast`; nothing is imported."""
import ast
import re
from pathlib import Path
from typing import Dict, List, Set

import pytest

from conftest import REPO

PACKAGE = REPO / 'zoo'
# a module may import modules of its own rank or below
RANKS = {
    'zoo': 1,  # the package itself: `import zoo` registers the models
    'zoo.files': 0, 'zoo.progress': 0, 'zoo.layers': 0,
    'zoo.models': 1, 'zoo.data': 1, 'zoo.recipes': 1, 'zoo.manifest': 1,
    'zoo.codecs': 2,
    'zoo.tasks': 3,
    'zoo.integrations': 4, 'zoo.bench': 4,
    'zoo.cli': 5,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES: Dict[str, Path] = {_module_name(p): p for p in PACKAGE.rglob('*.py')}


def _rank(module: str) -> int:
    """The rank of the longest RANKS prefix of `module` (every module has one)."""
    prefixes = [p for p in RANKS if module == p or (p != 'zoo' and module.startswith(p + '.'))]
    assert prefixes, f'{module} has no place in the layer order: add its package to RANKS and to DESIGN.md'
    return RANKS[max(prefixes, key=len)]


def _targets(module: str, node: ast.AST) -> List[str]:
    """Names an import statement may refer to, most specific first (`from a import b` may import module a.b)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module.split('.') if MODULES[module].name == '__init__.py' else module.split('.')[:-1]
    base = package[:len(package) - node.level + 1] if node.level else []
    origin = '.'.join(base + ([node.module] if node.module else []))
    return [f'{origin}.{alias.name}' for alias in node.names] + [origin]


def _resolve(name: str) -> str:
    """The zoo module a dotted name lives in ('' for outside modules)."""
    while name and name not in MODULES:
        name = name.rpartition('.')[0]
    return name


def _imports(module: str) -> Set[str]:
    """The zoo modules `module` imports anywhere in its source, except its own parent packages."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for name in _targets(module, node):
                target = _resolve(name)
                if target and target != module and not module.startswith(target + '.') and target != 'zoo':
                    found.add(target)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every import cycle, as the path found by a depth-first search from each module (one per back edge)."""
    cycles, state = [], {}

    def visit(node: str, path: List[str]) -> None:
        state[node] = 'open'
        for target in sorted(graph[node]):
            if state.get(target) == 'open':
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 'done'

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return cycles


def test_the_cycle_finder_finds_cycles():
    assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c', 'a']]
    assert _cycles({'a': {'b'}, 'b': set()}) == []


def test_no_import_cycles():
    assert not _cycles(GRAPH), '\n'.join(' -> '.join(cycle) for cycle in _cycles(GRAPH))


def test_imports_follow_the_layer_order():
    upward = sorted(f'{module} (rank {_rank(module)}) imports {target} (rank {_rank(target)})'
                    for module, targets in GRAPH.items() for target in targets if _rank(target) > _rank(module))
    assert not upward, '\n'.join(upward)


def test_imports_are_seen_inside_functions():
    """The reader sees lazy imports (the ones that hide cycles): cli imports task modules only inside functions."""
    assert 'zoo.tasks.classification' in GRAPH['zoo.cli']


FAMILIES = sorted(p.stem for p in (PACKAGE / 'models').glob('*.py') if not p.stem.startswith('_'))


@pytest.mark.parametrize('module', sorted(m for m in MODULES if m.startswith('zoo.tasks')))
def test_tasks_never_name_a_model_family(module):
    source = MODULES[module].read_text()
    named = [family for family in FAMILIES if re.search(rf'\b{re.escape(family)}\b', source)]
    assert not named, f'{module} names the model families {named}: talk to backbones through timm\'s contract'


def test_nothing_cites_files_outside_the_repository():
    """A clone of the repository has no ../shared: code, recipes, configs, benchmarks and the README cite the
    project's own docs/ (only the parity fixtures are looked up there, by the tests, when ZOO_FIXTURES is unset)."""
    places = [REPO / 'README.md', *(p for folder in ('zoo', 'recipes', 'configs', 'benchmarks', 'docs', 'tools')
                                    for p in (REPO / folder).rglob('*') if p.suffix in ('.py', '.yaml', '.md', '.sh'))]
    citing = [str(p.relative_to(REPO)) for p in places if re.search(r'\.\./shared(?!/fixtures)|/work/shared|anchors/',
                                                                      p.read_text())]
    assert not citing, citing
