"""The quality benchmark's smoke run (benchmarks/quantization_quality.py): it runs the formats through the real
load path, and its figures order the formats as their rounding predicts."""

from benchmarks import quantization_quality


def test_quick_run_orders_the_formats_by_their_rounding():
    [result] = quantization_quality.run(quick=True)
    kl = {(row["weights"], row["format"], row["activations"]): row["kl_divergence"] for row in result["rows"]}
    assert len(kl) == 2 * (3 * 3 + 2)  # two weight kinds; int8/int4 formats x 3 activation dtypes, bf16 x 2
    for weights in ("gaussian", "outliers"):
        bf16, int8, int4 = (kl[(weights, fmt, "float32")] for fmt in ("bf16", "int8", "int4 g128"))
        assert 0 < bf16 < int8 < int4
    # outlier channels hurt integer weights more than iid ones
    assert kl[("outliers", "int8", "float32")] > kl[("gaussian", "int8", "float32")]
    assert "| gaussian | int8 | float32 |" in quantization_quality.markdown(result)
