"""The house rules a reader relies on, checked on the source itself."""

import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "keras_tune"
MAX_FUNCTION_LINES = 80
# A function may run longer only with a comment on its first line saying why.
_LONG_OK = re.compile(r"#\s*long:")
# Private attributes of other packages: only keras_tune/compat.py may touch them.
_PRIVATE_USES = re.compile(r"keras\.src|_flatten_layers|_compute_attention_mask|\._kernel\b|_type_traits|_lora_enabled_layers|\._lora_rank")


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def test_no_function_runs_over_80_lines_without_saying_why():
    long = []
    for path in _sources():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and not _LONG_OK.search(lines[node.lineno - 1]):
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({length} lines)")
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
    shells = {"cli.py", "fit.py", "generate.py", "evaluate.py", "export.py"}
    for path in _sources():
        text = path.read_text().split('if __name__ == "__main__":')[0]  # an entry block may call cli
        if path.name not in shells:
            assert "argparse" not in text and "add_argument" not in text, path
        # No library room imports a command-line shell.
        if path.name not in shells | {"__init__.py"}:
            assert not re.search(r"from keras_tune(\.| import )(fit|generate|evaluate|export|cli)\b", text), path
