"""The README and the documentation site (``docs/``) say only what holds (issue 21).

* every ``python train.py …`` / ``python eval.py …`` command line they show composes with Hydra as
  written (code blocks and inline code; continued lines joined; ``-m a,b`` sweeps with their first
  value; placeholders such as ``<run>`` or ``...`` stand for a value, and a command whose config
  *group* is a placeholder, e.g. ``adapter=<any>``, is not composed);
* every ``python -m <module>`` they name is importable, and every repository path they name in
  inline code (``zoo/…``, ``tasks/…``, ``conf/…``, ``tests/…``, …) exists, so a file that moves must
  take its documentation with it;
* no page names a path outside the repository (the project's shared reference folders, a home
  directory), and the README's links stay inside the repository.

``mkdocs build --strict`` (``.ci/run``) checks the links between pages and the API references.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

import zoo

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
GROUPS = {p.name for p in CONF.iterdir() if p.is_dir()}
PLACEHOLDER = "@PLACEHOLDER@"
# what another branch adds (s4/firsthour: the image-folder layout and `python -m zoo predict`): a line
# using it is expected to fail until that branch is merged, and then must work (strict xfail: delete
# these entries at that merge)
PENDING: dict[str, str] = {}  # override -> why it is expected not to compose yet (strict xfail)
PENDING_ZOO_COMMANDS: dict[str, str] = {}  # `python -m zoo` subcommand -> why it is not there yet
OUTSIDE = re.compile(r"/work/|\.\./shared|shared/reference|/home/|~/(?!\.cache/adapterzoo)")
REPO_PATH = re.compile(r"^(?:zoo|tasks|bench|conf|tests|notebooks|docs)/(?:[\w.-]+/)*(?:[\w-]+\.(?:py|yaml|md|ipynb|json|txt|png|toml))?$")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines inside fenced code blocks, continued lines joined."""
    out, in_code, continued = [], False, False
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_code, continued = not in_code, False
            continue
        if not in_code:
            continue
        if continued:
            out[-1] = (out[-1][0], out[-1][1][:-1] + " " + line.strip())
        else:
            out.append((no, line))
        continued = out[-1][1].endswith("\\")
    return out


def inline_code(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the inline code spans outside fenced blocks (a span may wrap a line)."""
    text, spans = path.read_text(), []
    prose = re.sub(r"^\s*```.*?^\s*```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose):
        spans.append((prose.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())))
    return spans


def commands() -> list[tuple[str, str, list[str]]]:
    """(where, entry point, overrides) of every train.py / eval.py command line of the docs."""
    out = []
    for path in DOC_FILES:
        for no, line in code_lines(path) + inline_code(path):
            line = re.sub(r"<[^<>]*>", PLACEHOLDER, line).replace("...", PLACEHOLDER).replace("…", PLACEHOLDER)
            for cmd in re.split(r"&&|;", line.split("#", 1)[0]):
                m = re.search(r"(?:^|\s)(train|eval)\.py(?:\s|$)", cmd)
                if not m or not re.search(r"\bpython\s+(?:\S+/)?(?:train|eval)\.py|torchrun|srun", cmd):
                    continue
                out.append((f"{rel(path)}:{no}", m.group(1), shlex.split(cmd[m.end():])))
    return out


def overrides_as_written(args: list[str]) -> list[str] | None:
    """The Hydra overrides of a command's arguments; None when a config group is a placeholder."""
    out = []
    for a in args:
        if a in ("-m", "--multirun") or a.strip(PLACEHOLDER) == "":
            continue
        if "=" not in a:
            raise ValueError(f"not a Hydra override: {a!r}")
        key, value = a.split("=", 1)
        if PLACEHOLDER in value or PLACEHOLDER in key:
            if key.lstrip("+~") in GROUPS or "/" in key or PLACEHOLDER in key:
                return None
            value = value.replace(PLACEHOLDER, "x")
        if "," in value and not re.search(r"[\[{'\"]", value):  # a sweep: its first value
            value = value.split(",", 1)[0]
        out.append(f"{key}={value}")
    return out


def _params():
    params, seen = [], set()
    for where, entry, args in commands():
        try:
            ov = overrides_as_written(args)
        except ValueError as e:  # reported by the test, not at collection
            ov = [f"<{e}>"]
        if ov is None or (entry, tuple(ov)) in seen:  # a line shown twice is composed once
            continue
        seen.add((entry, tuple(ov)))
        pending = [PENDING[o] for o in ov if o in PENDING]
        marks = [pytest.mark.xfail(strict=True, reason=pending[0])] if pending else []
        params.append(pytest.param(entry, ov, id=f"{where} {entry}", marks=marks))
    return params


CMDS = _params()


@pytest.fixture(scope="module")
def hydra_conf():
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tasks.runner import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def test_the_docs_show_commands_of_every_kind():
    """The extraction finds what the docs show (a broken parser would make the next test vacuous)."""
    where = {p.id.split(":")[0] for p in CMDS}
    assert {"README.md", "docs/getting-started.md", "docs/modalities/pde.md", "docs/model-zoo.md"} <= where
    assert len(CMDS) >= 80  # distinct command lines
    ov = [p.values[1] for p in CMDS]
    assert ["adapter=lora", "+adapter.init_from=zoo:NAME"] in ov  # the model-zoo page's line
    assert ["experiment=clip_lora", "task.dataset=$d", "task.shots=16", "seed=1", "task.heldout=[ImageNet]"] in ov
    assert any(p.values[0] == "eval" for p in CMDS)


@pytest.mark.parametrize("entry,overrides", CMDS)
def test_doc_command_composes_as_written(hydra_conf, entry, overrides):
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    assert not (overrides and overrides[0].startswith("<")), overrides[0]
    cfg = compose("train" if entry == "train" else "eval", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    run_dir = OmegaConf.select(cfg, "hydra.run.dir")
    assert run_dir, overrides
    if entry == "train":
        assert cfg.adapter.name in zoo.list_adapters(), overrides
        if not any(o.startswith("hydra.run.dir=") for o in overrides):
            assert "/logs/runs/" in run_dir, overrides


def doc_modules() -> list[str]:
    names = set()
    for path in DOC_FILES:
        for _, text in code_lines(path) + inline_code(path):
            names |= set(re.findall(r"\bpython\s+-m\s+([A-Za-z_]\w*(?:\.\w+)*)", text))
    return sorted(names)


@pytest.mark.parametrize("module", doc_modules())
def test_doc_module_exists(module):
    assert importlib.util.find_spec(module) is not None, f"`python -m {module}` is named in the docs but does not exist"


def zoo_commands() -> list:
    names = set()
    for path in DOC_FILES:
        for _, text in code_lines(path) + inline_code(path):
            names |= set(re.findall(r"\bpython -m zoo ([a-z][\w-]*)", text))  # one space: not a diagram
    return [pytest.param(n, marks=[pytest.mark.xfail(strict=True, reason=PENDING_ZOO_COMMANDS[n])]
                         if n in PENDING_ZOO_COMMANDS else []) for n in sorted(names)]


@pytest.mark.parametrize("command", zoo_commands())
def test_doc_zoo_subcommand_exists(command, capsys):
    """``python -m zoo <command> --help`` exits 0; an unknown subcommand is argparse's exit 2."""
    from zoo.__main__ import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0, capsys.readouterr().err


def test_the_docs_name_the_zoo_subcommands():
    assert {"list", "info", "download", "verify", "publish"} <= {p.values[0] for p in zoo_commands()}


def doc_paths() -> list[tuple[str, str]]:
    out = set()
    for path in DOC_FILES:
        for no, text in inline_code(path):
            for word in text.split():
                word = word.split("::", 1)[0].rstrip(".,;:)")
                if REPO_PATH.match(word) and not re.search(r"[<*{]", word):
                    out.add((f"{rel(path)}:{no}", word))
    return sorted(out)


def test_doc_paths_exist():
    paths = doc_paths()
    assert ("docs/architecture.md", "tasks/runner.py") in {(w.split(":")[0], p) for w, p in paths}
    missing = [f"{where}: {p}" for where, p in paths if not (ROOT / p).exists()]
    assert not missing, "the docs name repository paths that do not exist:\n" + "\n".join(missing)


def test_no_page_names_a_path_outside_the_repository():
    bad = []
    for path in [*DOC_FILES, ROOT / "mkdocs.yml"]:
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if OUTSIDE.search(line):
                bad.append(f"{rel(path)}:{no}: {line.strip()}")
    assert not bad, "cite the paper or the reference repository instead:\n" + "\n".join(bad)
    readme_links = re.findall(r"\]\(([^)#]+)", (ROOT / "README.md").read_text())
    assert readme_links
    for link in readme_links:
        if re.match(r"https?://", link):
            continue
        assert not link.startswith(("/", "..")) and (ROOT / link).exists(), link


def test_outside_path_check_catches_what_it_should():
    for line in ("from `/work/shared/reference/anchors.md`", "read from `../shared/reference/morph`",
                 "(`shared/reference/clip_fewshot_captioning.md` §2.4)", "/home/me/data"):
        assert OUTSIDE.search(line), line
    for line in ("data.root=/data/Synapse", "$ADAPTERZOO_HOME (default ~/.cache/adapterzoo)", "a shared filesystem"):
        assert not OUTSIDE.search(line), line
