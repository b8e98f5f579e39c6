"""The house rules a reader relies on, checked on the source itself."""

import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "keras_tune"
MAX_FUNCTION_LINES = 80
# A function may run longer only with a comment on its first line saying why.
_LONG_OK = re.compile(r"#.*\blong:")
MAX_PARAMETERS = 7
# A function may take more only with a comment on its first line saying why.
_MANY_OK = re.compile(r"#.*\bmany:")
# Private attributes of other packages: only keras_tune/compat.py may touch them.
_PRIVATE_USES = re.compile(r"keras\.src|_flatten_layers|_compute_attention_mask|\._kernel\b|_type_traits|_lora_enabled_layers|\._lora_rank")


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def _functions():
    """`(where, node, first line)` of every function in keras_tune/."""
    for path in _sources():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}", node, lines[node.lineno - 1]


def test_no_function_runs_over_80_lines_without_saying_why():
    long = []
    for where, node, first in _functions():
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES and not _LONG_OK.search(first):
            long.append(f"{where} ({length} lines)")
    assert not long, long


def test_private_apis_of_other_packages_are_used_only_in_compat():
    found = []
    for path in _sources():
        if path.name == "compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _PRIVATE_USES.search(line.split("#")[0]):
                found.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not found, found


def test_command_line_modules_are_the_only_ones_that_parse_flags():
    # Command shells: a top-level module named after its command, or a package's __main__.py.
    shells = {"cli.py", "fit.py", "generate.py", "evaluate.py", "export.py", "merge.py", "tokenizer.py", "__main__.py"}
    for path in _sources():
        text = path.read_text().split('if __name__ == "__main__":')[0]  # an entry block may call cli
        if path.name not in shells:
            assert "argparse" not in text and "add_argument" not in text, path
        # No library room imports a command-line shell.
        if path.name not in shells | {"__init__.py"}:
            assert not re.search(r"from keras_tune(\.| import )(fit|generate|evaluate|export|merge|tokenizer|cli)\b", text), path


def _family_names():
    from keras_tune.models import families

    return set(families.names())


def _mentions_family(node, names):
    """A string constant that is a family name, alone or inside a tuple/list/set literal."""
    if isinstance(node, ast.Constant):
        return node.value in names
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_mentions_family(element, names) for element in node.elts)
    return False


def _is_family_attribute(node):
    return isinstance(node, ast.Attribute) and node.attr == "family"


def test_no_module_outside_the_family_registry_compares_a_family_name():
    names, found = _family_names(), []
    families_dir = PACKAGE / "models" / "families"
    for path in _sources():
        if families_dir in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(_mentions_family(side, names) or _is_family_attribute(side) for side in sides):
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
            elif isinstance(node, ast.Dict) and any(key is not None and _mentions_family(key, names) for key in node.keys):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} (a dict keyed by family)")
    assert not found, found


def _module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path, module, modules):
    """The keras_tune modules `path` imports, at any depth of the file (lazy imports count)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from package import submodule` imports the submodule; `from module import name` the module.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def test_no_import_cycle_between_modules():
    modules = {_module_name(path): path for path in _sources()}
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    # Importing a package's submodule runs the package's __init__ first; that edge is Python's, not
    # the code's, so `from keras_tune.models import families` counts as an import of families alone.
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_no_function_takes_more_than_7_parameters_without_saying_why():
    many = []
    for where, node, first in _functions():
        arguments = node.args
        names = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
        names = [name for name in names if name not in ("self", "cls")]
        if len(names) > MAX_PARAMETERS and not _MANY_OK.search(first):
            many.append(f"{where} ({len(names)} parameters)")
    assert not many, many


def test_no_test_module_imports_another():
    tests = pathlib.Path(__file__).resolve().parent
    modules = {path.stem for path in tests.glob("test_*.py")}
    found = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [(node.module or "").split(".")[0]]
            found += [f"{path.name}:{node.lineno} imports {name}" for name in names if name in modules]
    assert not found, found
