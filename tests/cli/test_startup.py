"""The command line starts light: importing the packages' errors and parsing every command's --help load neither
torch nor transformers (their time is bench/cli_startup.py's)."""

import json
import os
import subprocess
import sys

from tests.fixtures.cli_check import ROOT

HEAVY = ("torch", "transformers")

PARSE_EVERY_HELP = """
import contextlib, io
from tasks.cli import COMMANDS, build_parser
parser = build_parser()
for argv in ([], *([name] for name in COMMANDS)):
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
        parser.parse_args([*argv, "--help"])
"""


def _imported_after(code: str) -> list[str]:
    """The heavy packages in sys.modules after running `code` in a fresh interpreter."""
    report = f"\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", code + report], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_error_modules_and_the_lazy_package_import_nothing_heavy():
    assert _imported_after("import vilbert, vilbert.errors, features.errors, tasks.errors") == []


def test_parsing_every_commands_help_imports_no_torch_or_transformers():
    assert _imported_after(PARSE_EVERY_HELP) == []


def test_the_lazy_package_still_gives_its_names_and_registers_the_auto_classes():
    code = ("import vilbert\nassert 'ViLBertForVLTasks' in dir(vilbert)\nvilbert.ViLBertModel\n"
            "from transformers import AutoConfig, AutoModel\n"
            "assert AutoConfig.for_model('vilbert').__class__ is vilbert.ViLBertConfig\n"
            "assert AutoModel._model_mapping[vilbert.ViLBertConfig] is vilbert.ViLBertModel")
    assert _imported_after(code) == ["torch", "transformers"]
