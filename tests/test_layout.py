"""The tree's rules, checked on the code itself: production code never imports the test and demo
tools (``ctd/testing/``), the pure statistics import neither Ray, torch nor I/O, and the modules
whose functions run inside Ray workers never load matplotlib (the plotting module is the driver's)."""

import ast
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# modules whose functions and classes Ray ships to workers (stage classes, map_batches functions,
# tree reductions): importing them must stay light
WORKER_MODULES = [
    "ctd.pipeline.corpus",
    "ctd.pipeline.jsonl_source",
    "ctd.pipeline.stages",
    "ctd.pipeline.dedup",
    "ctd.pipeline.raydata",
    "ctd.pipeline.scoring",
    "ctd.experts.base",
    "ctd.experts.prompt",
    "ctd.experts.vllm",
    "ctd.experts.http",
    "ctd.experts.classifier",
    "ctd.audit.selection",
    "ctd.audit.results",
    "ctd.audit.facts",
    "ctd.audit.review",
    "ctd.audit.judging",
    "ctd.runs.verify",
    "ctd.monitor.replay",
]


def imports_of(path: str, mod: str | None = None) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved), anywhere in it."""
    mod = mod or os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    package = mod.rsplit(".", 1)[0] if not mod.endswith("__init__") else mod[: -len(".__init__")]
    out = set()
    for kind, module, level, names in _import_nodes(path):
        if kind == "import":
            out |= set(names)
        else:
            base = module or ""
            if level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{n}" for n in names}
    return out


_NODES = """import ast, json, sys
t = ast.parse(open(sys.argv[1], encoding="utf-8").read())
print(json.dumps([["import", None, 0, [a.name for a in n.names]] if isinstance(n, ast.Import)
                  else ["from", n.module, n.level, [a.name for a in n.names]]
                  for n in ast.walk(t) if isinstance(n, (ast.Import, ast.ImportFrom))]))"""


def _import_nodes(path: str) -> list:
    """(kind, module, level, names) of every import statement; parsed in a fresh interpreter when this
    one's AST constructor is in a bad state (CPython 3.11 raises SystemError "AST constructor recursion
    depth mismatch" after some libraries loaded earlier in the session touched the recursion limit)."""
    try:
        tree = ast.parse(open(path, encoding="utf-8").read())
    except SystemError:
        r = subprocess.run([sys.executable, "-c", _NODES, path], capture_output=True, text=True, check=True)
        return json.loads(r.stdout)
    return [
        ("import", None, 0, [a.name for a in n.names])
        if isinstance(n, ast.Import)
        else ("from", n.module, n.level, [a.name for a in n.names])
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
    ]


def production_files():
    for top in ("ctd", "jobs"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                p = os.path.join(d, f)
                rel = os.path.relpath(p, ROOT)
                if (
                    f.endswith(".py")
                    and not rel.startswith(os.path.join("ctd", "testing"))
                    and rel != os.path.join("jobs", "demo.py")
                ):
                    yield p


def test_production_code_never_imports_the_testing_tools():
    bad = {os.path.relpath(p, ROOT): sorted(i for i in imports_of(p) if i.startswith("ctd.testing")) for p in production_files()}
    assert not {k: v for k, v in bad.items() if v}


def test_the_statistics_import_no_ray_torch_or_io():
    heavy = {"ray", "torch", "transformers", "fsspec", "s3fs", "pyarrow", "matplotlib"}
    stats = os.path.join(ROOT, "ctd", "stats")
    for f in os.listdir(stats):
        if f.endswith(".py"):
            got = [
                i
                for i in imports_of(os.path.join(stats, f))
                if i.split(".")[0] in heavy or (i.startswith("ctd.") and not i.startswith("ctd.stats"))
            ]
            assert not got, (f, got)


def test_worker_modules_never_load_matplotlib_or_the_testing_tools():
    """What a Ray worker running audit code imports loads no plotting, no testing tools and no SciPy
    statistics (~1 s of every worker's start: imported where used)."""
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in WORKER_MODULES)
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib' or m in ('ctd.reporting.plots', "
        "'scipy.stats') or m.startswith('ctd.testing'))\nprint(bad)\nsys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_redaction_loads_no_model_library():
    """Presidio's recognizers are loaded without the NLP engines' packages (ctd/reporting/redact.py:_build):
    the audit driver, which redacts the review excerpts, never imports torch or transformers for them."""
    code = (
        "import sys\nfrom ctd.reporting.redact import redact_personal\n"
        "assert redact_personal('write to jane.doe@example.com') == 'write to <EMAIL_ADDRESS>'\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\nprint(bad)\nsys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow  # imports torch and transformers: ~4 s
def test_model_loading_imports_no_scikit_learn():
    """An activation or judge actor loads its model through ctd.model.activations.transformers_models,
    which keeps transformers from importing scikit-learn (~2 s of every actor's start)."""
    code = (
        "import sys\nfrom ctd.model.activations import transformers_models\n"
        "transformers_models().AutoModel, transformers_models().AutoModelForSequenceClassification\n"
        "import transformers.modeling_utils, transformers.generation.candidate_generator\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn')\nprint(bad[:5])\nsys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_check_sees_a_bad_import(tmp_path):
    """The import reader resolves relative imports, nested ones too: the checks above can fail."""
    p = tmp_path / "probe.py"
    p.write_text("from ..testing import demo\ndef f():\n    from ..reporting import plots\n    import torch\n")
    assert {"ctd.testing", "ctd.testing.demo", "ctd.reporting.plots", "torch"} <= imports_of(str(p), "ctd.audit.probe")


def untyped_public_functions(path: str) -> list[str]:
    """Public functions and methods of a file with an argument or a return type not annotated."""
    tree, out = ast.parse(open(path, encoding="utf-8").read()), []

    def visit(node, cls=None):
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, ast.ClassDef):
                visit(ch, ch.name)
            elif isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef)) and (node is tree or isinstance(node, ast.ClassDef)):
                public = (not ch.name.startswith("_") or ch.name in ("__init__", "__call__")) and not (cls or "").startswith("_")
                args = [a for a in ch.args.args + ch.args.kwonlyargs if a.arg not in ("self", "cls")]
                if public and (any(a.annotation is None for a in args) or (ch.returns is None and ch.name != "__init__")):
                    out.append(f"{os.path.relpath(path, ROOT)}:{ch.lineno} {ch.name}")

    visit(tree)
    return out


def test_public_functions_have_type_hints(tmp_path):
    assert [u for p in production_files() for u in untyped_public_functions(p)] == []
    probe = tmp_path / "probe.py"
    probe.write_text("def f(x) -> int:\n    return 1\ndef _g(x):\n    pass\nclass A:\n    def m(self, y: int):\n        pass\n")
    assert [u.split(" ")[1] for u in untyped_public_functions(str(probe))] == ["f", "m"]  # the check can fail
