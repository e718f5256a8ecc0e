"""The consistency evaluation script (benchmarks/consistency_eval.py) runs its four arms end to
end on the offline providers and says that such figures only check the plumbing."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


async def test_the_evaluation_runs_four_arms_offline(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("consistency_eval", REPO / "benchmarks" / "consistency_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stories = tmp_path / "stories.txt"
    stories.write_text("A launch video for Aurora, a smart desk lamp\n\n")
    result = await module.main([
        "--offline", "--stories", str(stories), "--duration", "9", "--variations", "2", "--iterations", "1",
        "--models-dir", str(tmp_path / "models"), "--json", str(tmp_path / "out.json"),
    ])
    assert [(a["markers"], a["weight"]) for a in result["arms"]] == [(True, 0.0), (True, 0.2), (False, 0.0), (False, 0.2)]
    for arm in result["arms"]:
        assert arm["scenes"] == 2 and 0 <= arm["mean_consistency"] <= 100  # scenes 2 and 3 of 3
    assert all(a["selections_changed_vs_weight_0"] == 0 for a in result["arms"] if a["weight"] == 0)
    assert "only show that the plumbing works" in capsys.readouterr().out
    assert (tmp_path / "out.json").is_file()
