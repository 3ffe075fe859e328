"""diffusers' own model tests with ``patch()`` applied: the plugin (``tests/diffusers_upstream/``), the runner
(``tools/diffusers_upstream_tests.py``) and the committed result of the real run.

diffusers' tests are not installed with diffusers, and CI cannot fetch its repository: the real run is
``make diffusers-tests DIFFUSERS_SRC=/path/to/diffusers``, whose report is committed
(``docs/diffusers_upstream_tests.md``, ``benchmarks/results/diffusers_upstream_tests.jsonl``) and checked
here. With ``I2V_DIFFUSERS_TESTS`` pointing at a checkout, one of diffusers' test classes also runs both
ways from here. Everything else runs on a stand-in "checkout" whose test file builds tiny models the
way diffusers' tests do.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import textwrap

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402

import diffusers  # noqa: E402
from i2v_kernels.integrations.diffusers import core, patch_summary, patching  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "diffusers_upstream"))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import diffusers_upstream_tests as runner  # noqa: E402
import i2v_upstream_plugin as plugin  # noqa: E402

LATTE = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
             cross_attention_dim=16, sample_size=8, patch_size=2, norm_type="ada_norm_single", caption_channels=16,
             norm_elementwise_affine=False, norm_eps=1e-6, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
             video_length=3)


def latte_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 4, 3, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                encoder_hidden_states=torch.randn(2, 5, 16, generator=g))


@pytest.fixture
def hooked(monkeypatch):
    """The plugin's hooks on LatteTransformer3DModel and the measured call, undone after the test."""
    cls = diffusers.LatteTransformer3DModel
    monkeypatch.setattr(cls, "__init__", cls.__init__)
    monkeypatch.setattr(core, "_measured_call", core._measured_call)
    plugin.LEDGER.reset()

    def install(patch_it=True):
        plugin.wrap_init(cls, patch_it)
        monkeypatch.setattr(plugin, "KNOWN_MODELS", {"LatteTransformer3DModel"})
        plugin.install(patch_it)
        return cls

    yield install
    plugin.LEDGER.reset()


def test_every_construction_route_is_patched(hooked, tmp_path):
    """``Model(...)``, ``from_config``, ``from_pretrained`` (both loading paths) end patched, copies
    carry the patch, the config machinery still sees the real signature, and our code runs."""
    cls = hooked()
    model = cls(**LATTE).eval()
    assert "num_layers" in cls.extract_init_dict(dict(model.config))[0]
    model.save_pretrained(tmp_path)
    built = [cls.from_config(model.config), cls.from_pretrained(tmp_path, low_cpu_mem_usage=True),
             cls.from_pretrained(tmp_path, low_cpu_mem_usage=False)]
    assert [e["class"] for e in plugin.LEDGER.built] == ["LatteTransformer3DModel"] * 4
    assert all(e["replaced"] > 0 for e in plugin.LEDGER.built), plugin.LEDGER.built
    twin = copy.deepcopy(built[1])
    for m in (model, *built, twin):
        assert patch_summary(m) is not None and patch_summary(m).replaced
    with torch.no_grad():
        outs = [m.eval()(**latte_inputs()).sample for m in (model, built[1], built[2], twin)]
    assert plugin.LEDGER.ours == 4 and plugin.LEDGER.theirs == 0
    patching.unpatch(model)
    with torch.no_grad():
        ref = model(**latte_inputs()).sample
    for out in outs:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_unpatched_mode_only_counts(hooked):
    cls = hooked(patch_it=False)
    model = cls(**LATTE)
    assert patch_summary(model) is None
    assert plugin.LEDGER.built == [{"class": "LatteTransformer3DModel", "replaced": 0, "kept": 0}]


def test_a_patch_that_replaces_nothing_fails_loudly(hooked, monkeypatch):
    cls = hooked()
    monkeypatch.setattr(patching, "_COMPONENTS", {})
    with pytest.raises(plugin.SilentlySkipped, match="replaced nothing on the LatteTransformer3DModel"):
        cls(**LATTE)


def test_mode_variable_is_checked(monkeypatch):
    monkeypatch.setenv(plugin.PATCH_ENV, "yes")
    with pytest.raises(ValueError, match="I2V_UPSTREAM_PATCH must be 0 or 1"):
        plugin.patching()


def read_results(path) -> dict:
    head, tests = runner.read_results(path)
    return {**head, "tests": tests}


# A stand-in for a diffusers checkout: a test file that builds and runs a model the way diffusers' do
FAKE_TESTS = f"""
import pytest
import torch
from diffusers import LatteTransformer3DModel

CONFIG = {LATTE!r}


def inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 4, 3, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                encoder_hidden_states=torch.randn(2, 5, 16, generator=g))


class TestLatteStandIn:
    def test_save_load_same_output(self, tmp_path):
        model = LatteTransformer3DModel(**CONFIG).eval()
        model.save_pretrained(tmp_path)
        loaded = LatteTransformer3DModel.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs()).sample, model(**inputs()).sample)

    def test_notices_the_patch(self):
        model = LatteTransformer3DModel(**CONFIG)
        assert "_i2v_kernels_patch_summary" not in model.__dict__

    def test_needs_a_gpu(self):
        pytest.skip("test requires a hardware accelerator")
"""


def test_runner_compares_both_ways(tmp_path):
    """The runner on the stand-in: same outcomes where the patch is invisible, the test that sees the
    patch reported as differing (exit status 1), skip reasons and counts in the report."""
    src = tmp_path / "diffusers"
    (src / "tests" / "models").mkdir(parents=True)
    (src / "tests" / "models" / "test_standin.py").write_text(textwrap.dedent(FAKE_TESTS))
    out_json, out_md = tmp_path / "r.jsonl", tmp_path / "r.md"
    rc = runner.main(["--src", str(src), "--src-rev", "stand-in", "--files", "tests/models/test_standin.py",
                      "--nice", "0", "--json", str(out_json), "--md", str(out_md)])
    assert rc == 1
    result = read_results(out_json)
    key = "tests/models/test_standin.py::TestLatteStandIn::"
    assert [d["nodeid"] for d in result["differ"]] == [key + "test_notices_the_patch"]
    patched, unpatched = result["tests"]["patched"], result["tests"]["unpatched"]
    assert patched[key + "test_save_load_same_output"]["outcome"] == "passed"
    saved = key + "test_save_load_same_output"
    assert patched[saved]["models"] == unpatched[saved]["models"] == {"LatteTransformer3DModel": 2}
    assert patched[saved]["replaced_min"] > 0 and unpatched[saved]["replaced_min"] == 0
    assert patched[saved]["ours"] == 2 and unpatched[saved]["ours"] == 0
    for mode in (patched, unpatched):
        assert mode[key + "test_needs_a_gpu"] == {"outcome": "skipped", "ours": 0,
                                                  "detail": "test requires a hardware accelerator"}
    md = out_md.read_text()
    assert "| `test_standin.py::TestLatteStandIn` | 2 / 1 | 1 / 1 | 0 / 1 | 1 |" in md, md
    assert "| test requires a hardware accelerator | 1 | needs a GPU" in md
    out_md.unlink()  # the report again from the results file alone
    assert runner.main(["--report-only", "--json", str(out_json), "--md", str(out_md)]) == 0
    assert out_md.read_text() == md


# ==================================================================================================
# The real run


def test_committed_results_are_clean():
    """The committed run covers every test file, both ways, with no test differing or failing patched,
    and every model a patched test built had something replaced."""
    result = read_results(os.path.join(ROOT, "benchmarks", "results", "diffusers_upstream_tests.jsonl"))
    assert not result["differ"]
    files = {nodeid.split("::")[0] for nodeid in result["tests"]["patched"]}
    assert files == set(runner.FILES)
    for mode in ("patched", "unpatched"):
        tests = result["tests"][mode]
        assert set(tests) == set(result["tests"]["unpatched"])
        assert not [n for n, r in tests.items() if r["outcome"] in ("failed", "error")]
    patched = result["tests"]["patched"].values()
    assert all(r["replaced_min"] > 0 for r in patched if "models" in r)
    assert sum(r["outcome"] == "passed" and r["ours"] > 0 for r in patched) >= 90  # 99 in the 2026-12-05 run
    with open(os.path.join(ROOT, "docs", "diffusers_upstream_tests.md")) as f:
        assert "None: every test has the same outcome patched and unpatched." in f.read()


@pytest.mark.skipif(not os.environ.get("I2V_DIFFUSERS_TESTS"), reason="I2V_DIFFUSERS_TESTS (a diffusers checkout) "
                    "is not set; the committed run is checked by test_committed_results_are_clean")
def test_diffusers_latte_model_tests_both_ways(tmp_path):
    rc = runner.main(["--src", os.environ["I2V_DIFFUSERS_TESTS"], "--files",
                      "tests/models/transformers/test_models_transformer_latte.py::TestLatteTransformer",
                      "--json", str(tmp_path / "r.jsonl"), "--md", str(tmp_path / "r.md")])
    assert rc == 0, (tmp_path / "r.md").read_text()
