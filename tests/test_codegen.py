"""The DSL (codegen/dsl.py), the V4 description (codegen/v4.py) and the emitter."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from codegen import dsl
from codegen.dsl import LAYER, DslError, DType, Kind, Model, select
from codegen.emit import OUTPUTS, generate, render
from codegen.v4 import MODEL

REPO = Path(__file__).resolve().parent.parent


def small_model() -> Model:
    m = Model("toy")
    n_layer = m.hparam("n_layer_all", "block_count", Kind.U32, "layers")
    d = m.hparam("n_embd", "embedding_length", Kind.U32, "width")
    r = m.hparam("ratio", "ratios", Kind.INT_ARRAY, "per layer", choices=(0, 4), length=n_layer)
    m.tensor("w", "blk.{il}.w.weight", (d, select(r.eq(4), 2, 1) * d), DType.WEIGHT, "w")
    m.tensor("c", "blk.{il}.c.weight", (d,), DType.F32, "c", when=r.ne(0))
    m.tensor("emb", "emb.weight", (d, 7), DType.WEIGHT, "e")
    return m


# --- expressions ---------------------------------------------------------------------------------

def test_expressions_evaluate_and_print_as_cpp():
    m = small_model()
    d, r = m.sym("n_embd"), m.sym("ratio")
    e = select(r.eq(4), 2, 1) * d + 3
    env = {"n_embd": 10, "ratio": [0, 4], "il": 1}
    assert e.eval(env) == 23
    assert e.eval({**env, "il": 0}) == 13
    assert e.cpp() == "((((hp.ratio[il] == 4) ? 2 : 1) * hp.n_embd) + 3)"
    assert e.cpp(wide=True) == "((((ratio == 4) ? 2 : 1) * n_embd) + 3)"
    assert e.per_layer() and not (d * 2).per_layer()
    assert (d // 4).eval({"n_embd": 10}) == 2


def test_expressions_reject_misuse():
    m = small_model()
    d = m.sym("n_embd")
    with pytest.raises(DslError, match="truth value"):
        bool(d > 1)
    with pytest.raises(DslError, match="boolean"):
        d & d
    with pytest.raises(DslError, match="boolean"):
        select(d, 1, 2)
    with pytest.raises(DslError, match="cannot use"):
        d + "x"
    with pytest.raises(DslError, match="division by zero"):
        (d // 0).eval({"n_embd": 1})


# --- declarations --------------------------------------------------------------------------------

def test_tensor_shapes_are_inferred_per_layer():
    m = small_model()
    exp = m.expected_tensors({"n_layer_all": 2, "n_embd": 8, "ratio": [0, 4]})
    assert exp["blk.0.w.weight"][0] == (8, 8)
    assert exp["blk.1.w.weight"][0] == (8, 16)
    assert "blk.0.c.weight" not in exp and exp["blk.1.c.weight"][0] == (8,)
    assert exp["emb.weight"] == ((8, 7), DType.WEIGHT, True)


def test_declarations_reject_misuse():
    m = small_model()
    d, r = m.sym("n_embd"), m.sym("ratio")
    with pytest.raises(DslError, match="declared twice"):
        m.hparam("n_embd", "other", Kind.U32, "dup")
    with pytest.raises(DslError, match="declared twice"):
        m.hparam("other", "embedding_length", Kind.U32, "dup key")
    with pytest.raises(DslError, match="rank 5"):
        m.tensor("x", "x.weight", (d, d, d, d, d), DType.WEIGHT, "")
    with pytest.raises(DslError, match="depends on the layer"):
        m.tensor("y", "y.weight", (r,), DType.WEIGHT, "")
    with pytest.raises(DslError, match="unknown symbols"):
        m.tensor("z", "z.weight", (dsl.Sym("nope"),), DType.WEIGHT, "")
    with pytest.raises(DslError, match="not boolean"):
        m.tensor("q", "blk.{il}.q", (d,), DType.F32, "", when=d)
    with pytest.raises(DslError, match="declared twice"):
        m.tensor("w", "blk.{il}.w2.weight", (d,), DType.F32, "")
    with pytest.raises(DslError, match="needs a length"):
        m.hparam("arr", "arr", Kind.F32_PER_LAYER, "no length")
    with pytest.raises(DslError, match="required key cannot have a default"):
        m.hparam("opt", "opt", Kind.U32, "x", default=3)
    with pytest.raises(DslError, match="valid identifier"):
        m.tensor("bad name", "b.weight", (d,), DType.F32, "")
    with pytest.raises(DslError, match="cannot depend on the layer"):
        m.derive("dd", r * 2, "per layer")
    m.foreign_family("draft", ["d.weight", "blk.{il}.d.weight"])
    for name in ("emb.weight", "d.weight"):          # the model's own tensor, a foreign one again
        with pytest.raises(DslError, match="declared already"):
            m.foreign_family("other", [name])
    with pytest.raises(DslError, match="placeholder"):
        m.foreign_family("other", ["blk.{n}.x.weight"])
    assert m.foreign == [("draft", "d.weight"), ("draft", "blk.{il}.d.weight")]


def test_v4_declares_every_tensor_of_the_spec_once():
    names = [t.name for t in MODEL.tensors]
    assert len(names) == len(set(names))
    for must in ("token_embd.weight", "output_hc_fn.weight", "blk.{il}.attn_kv_a_norm.weight",
                 "blk.{il}.exp_probs_b.bias", "blk.{il}.indexer.attn_q_b.weight",
                 "blk.{il}.indexer_compressor_ape.weight", "blk.{il}.nextn.eh_proj.weight"):
        assert must in names


def test_v4_shapes_for_the_real_model_match_spec_section_2():
    """Spec §2.1 with the real hyperparameters (D=4096, H=64, Dh=512, ...)."""
    env = {
        "n_layer_all": 44, "n_nextn": 1, "n_layer": 43, "n_embd": 4096, "n_head": 64,
        "head_dim": 512, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024,
        "indexer_n_head": 64, "indexer_head_dim": 128, "n_expert": 256, "n_expert_used": 6,
        "n_expert_shared": 1, "expert_ff": [2048] * 44, "hc_mult": 4, "hc_dim": 16384,
        "hc_mix": 24, "n_hash_layers": 3, "n_vocab": 129280,
        "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
    }
    exp = MODEL.expected_tensors(env)
    assert exp["blk.7.attn_output_a.weight"][0] == (4096, 8192)
    assert exp["blk.2.attn_compressor_kv.weight"][0] == (4096, 1024)
    assert exp["blk.3.attn_compressor_kv.weight"][0] == (4096, 512)
    assert exp["blk.3.attn_compressor_ape.weight"][0] == (512, 128)
    assert exp["blk.2.indexer.attn_q_b.weight"][0] == (1024, 8192)
    assert exp["blk.2.ffn_gate_tid2eid.weight"][0] == (6, 129280)
    assert "blk.3.ffn_gate_tid2eid.weight" not in exp and "blk.3.exp_probs_b.bias" in exp
    assert "blk.2.exp_probs_b.bias" not in exp
    assert exp["blk.43.nextn.eh_proj.weight"][0] == (8192, 4096)
    assert "blk.43.exp_probs_b.bias" in exp and "blk.43.attn_compressor_kv.weight" not in exp
    assert exp["output_hc_fn.weight"][0] == (16384, 4)
    assert exp["blk.0.ffn_down_exps.weight"][0] == (2048, 4096, 256)


# --- emitter ---------------------------------------------------------------------------------------

def test_emitter_is_deterministic_and_marks_files_generated():
    a, b = render(MODEL), render(MODEL)
    assert a == b
    for rel, text in a.items():
        assert "do not edit" in text.splitlines()[0], rel
        assert text.endswith("\n") and "\t" not in text and " \n" not in text, rel


def test_committed_generated_files_are_fresh():
    assert generate(REPO, check=True) == 0


def _copy_checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    for d in ("codegen", "native"):
        shutil.copytree(REPO / d, root / d, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_generate_check_fails_when_a_generated_file_is_edited_by_hand(tmp_path, capsys):
    root = _copy_checkout(tmp_path)
    assert generate(root, check=True) == 0
    target = root / "native" / "generated" / "weights.cpp"
    target.write_text(target.read_text().replace("Need::REQUIRED", "Need::OPTIONAL", 1))
    assert generate(root, check=True) == 1
    out = capsys.readouterr().out
    assert "stale" in out and "weights.cpp" in out
    assert generate(root, check=False) == 0      # regenerating repairs it
    assert generate(root, check=True) == 0


def test_generate_check_fails_when_a_generated_file_is_missing(tmp_path):
    root = _copy_checkout(tmp_path)
    (root / "native" / "include" / "dsv4.h").unlink()
    assert generate(root, check=True) == 1


def test_cli_generate_check_exit_codes(tmp_path):
    root = _copy_checkout(tmp_path)
    cmd = [sys.executable, "-m", "dsv4_ggml.cli", "generate", "--check", "--root", str(root)]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    f = root / "native" / "generated" / "hparams.cpp"
    f.write_text(f.read_text() + "// hand edit\n")
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1 and "hparams.cpp" in r.stdout


def test_every_output_has_a_template():
    for template in OUTPUTS.values():
        assert (REPO / "codegen" / "templates" / template).exists()


# --- the block IR (codegen/graph.py) -------------------------------------------------------------

from codegen.graph import T as T_DIM  # noqa: E402
from codegen.graph import Builder, Output, Variant, block_decorator, fold, same  # noqa: E402


def toy_blocks():
    m = small_model()
    h = m.hparam("n_head", "head_count", Kind.U32, "heads")
    dh = m.hparam("head_dim", "key_length", Kind.U32, "head dim")
    m.hparam("norm_eps", "eps", Kind.F32, "eps")
    m.tensor("q", "blk.{il}.q.weight", (m.sym("n_embd"), h * dh), DType.WEIGHT, "q")
    m.tensor("n", "blk.{il}.n.weight", (m.sym("n_embd"),), DType.F32, "n")
    blocks = []
    return m, blocks, block_decorator(m, blocks)


def test_block_ops_infer_shapes_and_name_values_after_locals():
    m, blocks, block = toy_blocks()
    d, h, dh = m.sym("n_embd"), m.sym("n_head"), m.sym("head_dim")

    @block("attn", "§x", params=[("x", (d, T_DIM))], output=Output((dh, h, T_DIM)))
    def attn(b, L, x):
        q = b.linear(L.q, b.rms_norm(x, L.n))
        heads = b.heads(q, h, dh)
        return b.rms_norm(heads)

    bld, out = attn.build(attn.variants[0])
    names = [st.out.name for st in bld.stmts]
    assert names == ["x_norm", "q", "heads", "out"]
    assert same(out.shape[0], dh) and same(out.shape[1], h)
    assert bld.stmts[1].render() == "ggml_mul_mat(ctx, L.q, x_norm)"
    assert bld.stmts[2].render() == "ggml_reshape_3d(ctx, q, head_dim, n_head, T)"
    assert bld.dims_used == {"head_dim", "n_head"}


def test_block_ops_reject_shape_mismatches():
    m, blocks, block = toy_blocks()
    d, h, dh = m.sym("n_embd"), m.sym("n_head"), m.sym("head_dim")
    variant = Variant("", dsl.Const(True), {})
    b = Builder(m, variant, True)
    x = b.param("x", (d, T_DIM))
    q = b.param("q", (h * dh, T_DIM))
    w = b.param("w", (h, d))
    with pytest.raises(DslError, match="takes n_head inputs"):
        b.linear(w, x)
    with pytest.raises(DslError, match="is not 3 heads"):
        b.heads(q, 3, dh)
    with pytest.raises(DslError, match="does not broadcast"):
        b.add(x, q)
    with pytest.raises(DslError, match="does not match"):
        b.rms_norm(x, b.param("nw", (dh,)))
    with pytest.raises(DslError, match="only known to the runtime"):
        b.reshape(x, (dsl.Sym("n_view"), T_DIM))


def test_block_returning_the_wrong_shape_is_rejected():
    m, blocks, block = toy_blocks()
    d = m.sym("n_embd")

    @block("bad", "§x", params=[("x", (d, T_DIM))], output=Output((m.sym("n_head"), T_DIM)))
    def bad(b, L, x):
        return b.rms_norm(x)

    with pytest.raises(DslError, match="returns"):
        bad.build(bad.variants[0])


def test_products_compare_up_to_order_and_derived_definitions():
    from codegen.v4 import MODEL as V4
    Builder(V4, Variant("", dsl.Const(True), {}), True)   # registers the derived values
    hc, d = V4.sym("hc_mult"), V4.sym("n_embd")
    assert same(V4.sym("hc_dim"), d * hc)
    assert same(2 * 4, 8) and not same(d, hc)
    ratio = V4.sym("compress_ratios")
    c = fold(select(ratio.eq(4), 2, 1) * V4.sym("head_dim"), {"compress_ratios": 4})
    assert same(c, 2 * V4.sym("head_dim"))


def test_v4_blocks_have_one_function_per_variant():
    from codegen.v4 import BLOCKS
    names = {b.c_name(v) for b in BLOCKS for v in b.variants}
    assert {"attention_swa", "attention_csa", "attention_hca", "moe_hash", "moe_routed",
            "compress_csa", "compress_hca", "compress_indexer", "hc_pre", "layer", "token_rows", "embed",
            "head", "output_head", "mtp_input", "indexer"} == names


def test_dispatchers_fail_only_where_a_layer_can_match_no_variant():
    """Two complementary variants (hash / score routing) cover every layer: the second needs no
    test and the dispatcher no failure path; the attention variants (ratios 0, 4, 128) leave one
    for a ratio the loader did not reject."""
    from codegen.v4 import BLOCKS
    blocks = render(MODEL, BLOCKS)["native/generated/blocks.cpp"]
    moe = blocks[blocks.index("ggml_tensor * moe(Step & s"):]
    moe = moe[:moe.index("\n}\n")]
    assert "return moe_routed(s, L, il, x);" in moe and "fail(" not in moe and moe.count("if (") == 1
    attention = blocks[blocks.index("ggml_tensor * attention(Step & s"):]
    assert 'fail(DSV4_ERR_INTERNAL, "attention: no variant' in attention[:attention.index("\n}\n")]
