"""Model families and gate judges: the generic code names no model, a family from outside the package runs
the whole CLI, and the package's imports form no circle."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "dopsd_continual"
NAMES = {"toy-shapes", "flux2-klein", "z-image-turbo", "flux2-klein-4b", "flux2-klein-9b"}
OWN_HOMES = ("families", "toy")  # a family's module and the toy world may name themselves


def _generic_modules():
    for f in sorted(PKG.rglob("*.py")):
        if f.relative_to(PKG).parts[0] not in OWN_HOMES:
            yield f


def test_no_generic_module_branches_on_a_model_or_imports_one():
    found = []
    for f in _generic_modules():
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                consts = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
                if any(c in NAMES for c in consts):
                    found.append(f"{f.relative_to(ROOT)}:{node.lineno} compares with a model's name")
            if isinstance(node, ast.ImportFrom) and node.module:
                mod = node.module.split(".")
                if f.name != "cli.py" and f.name != "demo.py" and "toy" in mod:  # the toy's own commands excepted
                    found.append(f"{f.relative_to(ROOT)}:{node.lineno} imports the toy world")
                if {"klein", "zimage"} & (set(mod) | {a.name for a in node.names}):
                    found.append(f"{f.relative_to(ROOT)}:{node.lineno} imports a family module by name")
    assert not found, "\n".join(found)


def test_the_round_sampler_gate_and_accountant_reach_the_model_only_through_its_family():
    for name in ("rounds.py", "training.py", "sampling.py", "gate.py", "stack.py", "memory.py"):
        for node in ast.walk(ast.parse((PKG / name).read_text())):  # the key may name a cache entry, never a branch
            if isinstance(node, ast.Compare):
                keys = {n.value for n in ast.walk(node) if isinstance(n, ast.Constant)}
                assert not keys & {"backend", "name"}, f"{name}:{node.lineno} branches on the model"
        assert "toy" not in {n.split(".")[0] for n in _imported(PKG / name)}, name


def _imported(f: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def _import_graph() -> dict[str, set[str]]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = f.with_suffix("").relative_to(ROOT).parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    edges = {m: set() for m in mods}
    for m, f in mods.items():
        here = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text())):  # lazy imports inside functions count too
            if isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for t in [target] + [f"{target}.{a.name}" for a in node.names]:
                    if t in mods and t != m:
                        edges[m].add(t)
    return edges


def test_the_package_imports_form_no_circle():
    edges = _import_graph()
    assert "dopsd_continual.status" in edges["dopsd_continual.web.server"]
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m, path):
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_every_relative_import_names_a_module_of_the_package():
    """`from .. import klein` after klein moved would import nothing on a fresh install."""
    missing = []
    for f in sorted(PKG.rglob("*.py")):
        here = f.parent
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = here
                for _ in range(node.level - 1):
                    base = base.parent
                target = base.joinpath(*node.module.split(".")) if node.module else base
                if node.module and not (target.with_suffix(".py").exists() or (target / "__init__.py").exists()):
                    missing.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.module}")
                if not node.module:
                    missing += [f"{f.relative_to(ROOT)}:{node.lineno} {a.name}" for a in node.names
                                if not ((base / f"{a.name}.py").exists() or (base / a.name / "__init__.py").exists())]
    assert not missing, missing


def test_the_toy_recipes_held_out_prompts_are_the_worlds():
    from dopsd_continual.gate import held_out_prompts
    from dopsd_continual.recipe import RECIPES_DIR, load_recipe
    from dopsd_continual.toy.world import held_out_captions

    caps = held_out_captions()
    assert held_out_prompts(load_recipe(RECIPES_DIR / "toy-shapes.toml")) == caps[::8][:24]
    general = held_out_prompts(load_recipe(RECIPES_DIR / "flux2-klein-4b.toml"))
    assert len(general) >= 40 and not set(general) & set(caps)
    # a toy recipe that leaves the gate's prompts and judges at their defaults (as earlier recipes did) gets the
    # model's own: its folder's dopsd-gate.json
    from dopsd_continual.gate import judge_names

    old = load_recipe(RECIPES_DIR / "toy-shapes.toml")
    old["gate"].update(prompts="default", judges=[])
    assert held_out_prompts(old) == caps[::8][:24] and judge_names(old) == ["toy-truth"]


def test_an_unknown_family_or_judge_is_one_line_at_load(tmp_path):
    from dopsd_continual.errors import UserError
    from dopsd_continual.families import family
    from dopsd_continual.recipe import RECIPES_DIR, load_recipe, validate

    raw = {"model": {"name": "x", "backend": "sdxl", "source": "x"}}
    with pytest.raises(UserError, match="model.backend must be one of"):
        validate(raw)
    with pytest.raises(UserError, match="gate.judges"):
        validate({**raw, "model": {**raw["model"], "backend": "flux2-klein"}, "gate": {"judges": ["aesthetics"]}})
    with pytest.raises(UserError, match="gate.clip_model"):
        validate({**raw, "model": {**raw["model"], "backend": "flux2-klein"}, "gate": {"judges": ["clip"]}})
    with pytest.raises(UserError, match="cannot import"):
        family("no_such_module:FAMILY")
    from dopsd_continual.judges import resolve

    with pytest.raises(UserError, match="cannot import"):
        resolve("no_such_module:Judge")
    assert family(load_recipe(RECIPES_DIR / "z-image-turbo.toml")).guidance == 0.0


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tests"))
    from family_tiny import build

    folder = tmp_path_factory.mktemp("tiny") / "weights"
    build(folder)
    return folder


def test_the_accountant_plans_a_family_from_outside_the_package(tiny_weights, tmp_path):
    from dopsd_continual import memory
    from dopsd_continual.recipe import validate

    recipe = validate({"model": {"name": "tiny", "backend": "family_tiny:FAMILY", "source": str(tiny_weights),
                                 "height": 64, "width": 64, "max_sequence_length": 32, "text_encoder_out_layers": [1, 2, 3]},
                       "train": {"targets": ["to_q", "to_k", "to_v"]}})
    plan = memory.Accountant(recipe, cache_dir=tmp_path).plan(4.0)
    assert plan.fits and plan.activation_gib["sample"] > 0 and plan.activation_gib["train"] > 0, plan.to_dict()


def test_a_family_from_outside_the_package_runs_init_ingest_train_with_the_gate_and_sample(tiny_weights, tmp_path):
    """docs/families.md followed: one module (tests/family_tiny.py) and one recipe, nothing in the package."""
    from conftest import make_pair

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(f"""
[model]
name = "tiny"
backend = "family_tiny:FAMILY"
source = {json.dumps(str(tiny_weights))}
steps = 2
height = 64
width = 64
max_sequence_length = 32
text_encoder_out_layers = [1, 2, 3]
teacher_instruction = ""

[train]
rank = 4
alpha = 4
targets = ["to_q", "to_k", "to_v"]
steps = 3
batch = 2
K = 2

[gate]
prompts = ["a red circle", "a blue square", "a green triangle"]
seeds = [0, 1]
judges = ["family_tiny:CountJudge"]
max_drift = 10
min_sharpness_ratio = 0
max_colour_shift = 10
min_seed_diversity_ratio = 0
max_few_step_gap_ratio = 1000
""")
    drop = tmp_path / "drop"
    drop.mkdir()
    for i in range(3):
        make_pair(drop, f"p{i}", caption=f"a photo of zxq number {i}", seed=i)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "HOME": str(tmp_path),
           "DOPSD_STABILITY_SECONDS": "0", "HF_HUB_OFFLINE": "1"}
    state = tmp_path / "state"

    def dopsd(*args):
        r = subprocess.run([sys.executable, "-m", "dopsd_continual.cli_entry", *map(str, args), "--state", str(state)],
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr[-3000:]
        return r.stdout

    dopsd("init", "--recipe", recipe, "--watch", drop)
    dopsd("ingest")
    out = json.loads(dopsd("train", "--json"))
    assert out["verdict"] == "accepted", out
    m = out["metrics"]
    assert m["judged_pictures"] == 6 and m["judged_concepts"] == 3  # the outside judge saw the gate's pictures
    assert "concept_gap_ratio" not in m  # this family has no reference path for the gate
    assert {"drift", "sharpness_ratio", "few_step_gap_ratio"} <= set(m)
    picture = tmp_path / "out.png"
    dopsd("sample", "a red circle", "--version", "v1", "--out", picture)
    from PIL import Image

    assert Image.open(picture).size == (64, 64)
