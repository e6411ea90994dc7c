"""The block half of the DSL: ops on symbolic tensors, recorded into C++ graph builders.

A block is a Python function `fn(b, L, *inputs)` over a `Builder` `b`. Each `b.<op>(...)`
checks its operands' shapes symbolically (ggml `ne` order, dims are `Expr`s over
hyperparameters and the batch size `T`), infers the result's shape and records one C++
statement. Blocks that differ by layer kind (window/CSA/HCA attention, hash/score routing) are
run once per `Variant`; the Python `if` on a variant attribute happens at generation time, so
the generated C++ has one function per variant and no flags threaded through it.

Stateful steps (window keys, compressor state, caches, the per-step plan) lower to calls on the
hand-written runtime (`Step`, native/src/step.h); everything else lowers to ggml calls.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from typing import Any, Callable, Sequence

from .dsl import Const, DslError, Expr, Model, Sym, TensorDecl, lift

T = Sym("T")                      # tokens in the micro-batch, of every sequence in it (C++: T = s.n_tokens)
# Dims known only to the runtime (used for shape checks, never emitted as C++ dims):
N_VIEW = Sym("n_view")            # compressed-cache rows visible to the batch
N_BLOCKS = Sym("n_blocks")        # compressor blocks processed in the batch
N_CACHE = Sym("n_cache")          # compressed-cache rows of every sequence slot
RUNTIME_DIMS = {"n_view", "n_blocks", "n_cache"}


_DERIVED: dict[str, Expr] = {}    # derived hyperparameters, expanded before comparing dims


def _canon(e: Expr) -> str:
    """A canonical text for a dim: derived symbols expanded, products as sorted factor lists."""
    from .dsl import BinOp
    if isinstance(e, Sym) and e.name in _DERIVED:
        return _canon(_DERIVED[e.name])
    if isinstance(e, BinOp) and e.op == "*":
        factors: list[str] = []
        const = 1
        stack = [e]
        while stack:
            x = stack.pop()
            if isinstance(x, Sym) and x.name in _DERIVED:
                x = _DERIVED[x.name]
            if isinstance(x, BinOp) and x.op == "*":
                stack += [x.a, x.b]
            elif isinstance(x, Const):
                const *= x.value
            else:
                factors.append(_canon(x))
        if not factors:
            return str(const)
        if const != 1:
            factors.append(str(const))
        return factors[0] if len(factors) == 1 else "*(" + ",".join(sorted(factors)) + ")"
    if isinstance(e, BinOp):
        return f"{e.op}({_canon(e.a)},{_canon(e.b)})"
    return e.describe()


def same(a: Any, b: Any) -> bool:
    """Equality of two dims up to commutativity of products and derived definitions."""
    a, b = fold(lift(a), {}), fold(lift(b), {})
    if isinstance(a, Const) and isinstance(b, Const):
        return a.value == b.value
    return _canon(a) == _canon(b)


def shape_str(shape: Sequence[Expr]) -> str:
    return "[" + ", ".join(lift(d).describe() for d in shape) + "]"


@dataclasses.dataclass(eq=False)
class Value:
    """A symbolic tensor (or a runtime struct when `ctype` is not a tensor)."""

    name: str
    shape: tuple[Expr, ...] | None
    dtype: str = "f32"
    ctype: str = "ggml_tensor *"
    ref: str | None = None        # C++ expression naming it (default: `name`)
    fixed_name: bool = False      # weights and parameters keep their names

    @property
    def cpp(self) -> str:
        return self.ref or self.name

    def dim(self, i: int) -> Expr:
        if self.shape is None or i >= len(self.shape):
            raise DslError(f"'{self.name}' has no dim {i} (shape {self._s()})")
        return self.shape[i]

    def _s(self) -> str:
        return "struct" if self.shape is None else shape_str(self.shape)

    def __repr__(self) -> str:
        return f"{self.name}{self._s()}"


class Member(Value):
    """A field of a struct value (`owner.member` in C++)."""

    def __init__(self, owner: Value, member: str, shape, dtype: str = "f32"):
        super().__init__(member, shape, dtype, fixed_name=True)
        self.owner = owner

    @property
    def cpp(self) -> str:  # type: ignore[override]
        return f"{self.owner.cpp}.{self.name}"


@dataclasses.dataclass
class Stmt:
    """One C++ statement: `out = fmt.format(*args)` (args are Values, rendered by name)."""

    out: Value | None
    fmt: str
    args: tuple = ()
    comment: str = ""

    def render(self) -> str:
        return self.fmt.format(*(a.cpp if isinstance(a, Value) else a for a in self.args))


@dataclasses.dataclass
class Variant:
    """One generated function of a block: a name suffix, the layers it applies to (`when`),
    attributes the block function reads (`L.<attr>`), and hyperparameter values the variant
    fixes (`known`, e.g. compress_ratios = 4), which fold into the weights' shapes."""

    suffix: str
    when: Expr
    attrs: dict[str, Any]
    known: dict[str, Any] = dataclasses.field(default_factory=dict)


def seen_named(b: "Builder") -> set[str]:
    return b.claimed


def fold(e: Expr, known: dict[str, Any]) -> Expr:
    """Partially evaluates `e` with the symbols in `known` (constant folding, select pruning)."""
    from .dsl import BinOp, Not, Select
    if isinstance(e, Sym):
        return Const(known[e.name]) if e.name in known else e
    if isinstance(e, BinOp):
        a, b = fold(e.a, known), fold(e.b, known)
        if isinstance(a, Const) and isinstance(b, Const):
            return Const(BinOp(e.op, a, b).eval({}))
        return BinOp(e.op, a, b)
    if isinstance(e, Not):
        a = fold(e.a, known)
        return Const(not a.value) if isinstance(a, Const) else Not(a)
    if isinstance(e, Select):
        c = fold(e.cond, known)
        if isinstance(c, Const):
            return fold(e.a if c.value else e.b, known)
        return Select(c, fold(e.a, known), fold(e.b, known))
    return e


class LayerView:
    """`L.<field>` -> the layer's weight as a Value; other attributes come from the variant."""

    def __init__(self, model: Model, attrs: dict[str, Any], layered: bool, known: dict[str, Any]):
        self._model = model
        self._attrs = attrs
        self._layered = layered
        self._known = known

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._attrs:
            return self._attrs[name]
        for t in self._model.tensors:
            if t.field == name and t.layered == self._layered:
                return weight_value(t, self._known)
        raise DslError(f"no {'layer ' if self._layered else ''}weight or attribute '{name}'")


def weight_value(t: TensorDecl, known: dict[str, Any]) -> Value:
    shape = tuple(fold(d, known) for d in (t.view if t.view is not None else t.shape))
    prefix = "L." if t.layered else "W."
    dtype = {"I32": "i32"}.get(t.dtype.name, "any")
    return Value(t.field, tuple(shape), dtype, ref=prefix + t.field, fixed_name=True)


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Builder:
    """Records the statements of one block variant.

    Every op checks its operands, infers the result shape and records one statement whose C++
    is a format string over the operand Values (rendered with their final names).
    """

    def __init__(self, model: Model, variant: Variant, layered: bool):
        for d in model.derived:
            _DERIVED[d.name] = d.expr
        self.model = model
        self.variant = variant
        self.layered = layered
        self.stmts: list[Stmt] = []
        self._names: set[str] = {"s", "L", "W", "il", "ctx", "hp", "T"}
        self.dims_used: set[str] = set()      # hyperparameters used as int64_t locals
        self.claimed: set[str] = set()        # names taken from the block function's locals

    # --- bookkeeping -------------------------------------------------------------------------
    def _fresh(self, base: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_]", "_", base).strip("_") or "t"
        name, i = base, 2
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def _emit(self, base: str, shape, fmt: str, *args, dtype: str = "f32", comment: str = "",
              ctype: str = "ggml_tensor *") -> Value:
        v = Value(self._fresh(base), tuple(lift(d) for d in shape) if shape is not None else None,
                  dtype, ctype)
        self.stmts.append(Stmt(v, fmt, args, comment))
        return v

    def claim_result(self, v: Value) -> None:
        """The returned value is called `out` (when it was not bound to a local)."""
        if "out" not in self._names:
            self._names.discard(v.name)
            v.name = "out"
            self._names.add("out")

    def claim(self, v: Value, local: str) -> None:
        """Names `v` after the block function's local variable it was assigned to, unless an
        earlier value already has that name (then `v` keeps its derived name)."""
        if local in self._names or not _IDENT.match(local):
            return
        self._names.discard(v.name)
        v.name = local
        self._names.add(local)
        self.claimed.add(local)

    def param(self, name: str, shape, dtype: str = "f32", ctype: str = "ggml_tensor *") -> Value:
        if not _IDENT.match(name) or name in self._names:
            raise DslError(f"parameter name '{name}' is not a free identifier")
        self._names.add(name)
        return Value(name, tuple(lift(d) for d in shape) if shape is not None else None, dtype,
                     ctype, fixed_name=True)

    def dim(self, d: Any) -> str:
        """C++ for an integer dim: hyperparameters become int64_t locals of the block function."""
        d = lift(d)
        if d.ty != "int":
            raise DslError(f"{d!r} is not an integer dim")
        for n in d.symbols():
            if n in RUNTIME_DIMS:
                raise DslError(f"dim {d!r} is only known to the runtime; use the tensor's ne")
            if n not in ("T", "il"):
                if self.model.sym(n).layered:
                    raise DslError(f"dim {d!r} uses the per-layer '{n}'")
                self.dims_used.add(n)
        text = d.cpp(wide=True)
        return text[1:-1] if text.startswith("(") and text.endswith(")") and _balanced(text[1:-1]) else text

    def scalar(self, x: Any) -> str:
        """C++ float for a constant, a (possibly per-layer) hyperparameter expression, or a C++
        expression given as a string."""
        if isinstance(x, str):
            return x
        if isinstance(x, Expr) and not isinstance(x, Const):
            for n in x.symbols():
                self.model.sym(n)
            return f"float({x.cpp()})"
        return f"{float(lift(x).value)!r}f"

    @staticmethod
    def _tensor(v: Any, what: str) -> Value:
        if not isinstance(v, Value) or v.shape is None:
            raise DslError(f"{what} must be a tensor value, got {v!r}")
        return v

    @staticmethod
    def _check(cond: bool, msg: str) -> None:
        if not cond:
            raise DslError(msg)

    # --- linear algebra --------------------------------------------------------------------------
    def linear(self, w: Value, x: Value, name: str | None = None) -> Value:
        """x @ W^T: W ne{in, out}, x ne{in, ...} -> ne{out, ...} (ggml_mul_mat)."""
        self._tensor(w, "linear weight")
        self._tensor(x, "linear input")
        self._check(len(w.shape) == 2, f"linear: weight {w!r} is not a matrix")
        self._check(same(w.dim(0), x.dim(0)),
                    f"linear: {w!r} takes {w.dim(0).describe()} inputs but {x!r} has {x.dim(0).describe()}")
        return self._emit(name or w.name, (w.dim(1), *x.shape[1:]), "ggml_mul_mat(ctx, {}, {})", w, x)

    def grouped_linear(self, w: Value, o: Value, groups: Expr, name: str | None = None) -> Value:
        """Per-group low-rank projection (§3.4.6): heads o ne{Dh, H, T} split into `groups` groups
        of consecutive heads, group g multiplied by w[:, :, g] (w ne{H·Dh/G, R, G}).
        Result ne{R·G, T}, group-major."""
        self._tensor(w, "grouped weight")
        self._tensor(o, "grouped input")
        self._check(len(w.shape) == 3 and len(o.shape) == 3,
                    f"grouped_linear: needs w ne{{in, R, G}} and o ne{{Dh, H, T}}, got {w!r}, {o!r}")
        self._check(same(w.dim(2), groups), f"grouped_linear: {w!r} does not have {lift(groups)!r} groups")
        width = o.dim(0) * o.dim(1) // groups
        self._check(same(w.dim(0), width), f"grouped_linear: group width {width!r} does not match {w!r}")
        base = name or w.name
        g = self._emit(base + "_in", (w.dim(0), o.dim(2), groups),
                       "ggml_permute(ctx, ggml_reshape_3d(ctx, {0}, {1}->ne[0], {1}->ne[2], {0}->ne[2]), 0, 2, 1, 3)",
                       o, w, comment="heads -> groups of consecutive heads, group axis last")
        z = self._emit(base + "_z", (w.dim(1), o.dim(2), groups), "ggml_mul_mat(ctx, {}, {})", w, g,
                       comment="one matmul per group, batched over the group axis")
        return self._emit(base, (w.dim(1) * groups, o.dim(2)),
                          "ggml_cont_2d(ctx, ggml_permute(ctx, {0}, 0, 2, 1, 3), {0}->ne[0] * {0}->ne[2], {0}->ne[1])",
                          z, comment="concatenate the groups, group-major")

    # --- normalisation and elementwise -----------------------------------------------------------
    def rms_norm(self, x: Value, w: Value | None = None, name: str | None = None) -> Value:
        """RMSNorm over ne0 with eps = norm_eps (§0), times `w` when given."""
        self._tensor(x, "rms_norm input")
        if w is None:
            return self._emit(name or x.name + "_norm", x.shape, "ggml_rms_norm(ctx, {}, hp.norm_eps)", x)
        self._check(len(w.shape) == 1 and same(w.dim(0), x.dim(0)),
                    f"rms_norm: weight {w!r} does not match {x!r}")
        return self._emit(name or x.name + "_norm", x.shape,
                          "ggml_mul(ctx, ggml_rms_norm(ctx, {}, hp.norm_eps), {})", x, w)

    def scale(self, x: Value, s: Any, bias: Any = 0.0, name: str | None = None) -> Value:
        """x·s + bias (ggml_scale / ggml_scale_bias)."""
        self._tensor(x, "scale input")
        sc, bc = self.scalar(s), self.scalar(bias)
        if bc == "0.0f":
            return self._emit(name or x.name + "_scaled", x.shape, "ggml_scale(ctx, {}, " + sc + ")", x)
        return self._emit(name or x.name + "_scaled", x.shape,
                          "ggml_scale_bias(ctx, {}, " + sc + ", " + bc + ")", x)

    _UNARY = {"sigmoid": "ggml_sigmoid", "sqrt": "ggml_sqrt", "softplus": "ggml_softplus",
              "silu": "ggml_silu", "relu": "ggml_relu"}

    def unary(self, op: str, x: Value, name: str | None = None) -> Value:
        self._tensor(x, f"{op} input")
        self._check(op in self._UNARY, f"unknown unary op '{op}'")
        return self._emit(name or f"{x.name}_{op}", x.shape, self._UNARY[op] + "(ctx, {})", x)

    def sigmoid(self, x: Value, name: str | None = None) -> Value:
        return self.unary("sigmoid", x, name)

    def add(self, a: Value, c: Value, name: str | None = None) -> Value:
        return self._binary("ggml_add", a, c, name or a.name + "_sum")

    def mul(self, a: Value, c: Value, name: str | None = None) -> Value:
        return self._binary("ggml_mul", a, c, name or a.name + "_prod")

    def div(self, a: Value, c: Value, name: str | None = None) -> Value:
        return self._binary("ggml_div", a, c, name or a.name + "_quot")

    def _binary(self, fn: str, a: Value, c: Value, name: str) -> Value:
        """Elementwise with ggml broadcasting: each dim of c is 1 or equal to a's."""
        self._tensor(a, fn)
        self._tensor(c, fn)
        self._check(len(c.shape) <= len(a.shape), f"{fn}: {c!r} has more dims than {a!r}")
        for i, d in enumerate(c.shape):
            self._check(same(d, 1) or same(d, a.dim(i)),
                        f"{fn}: {c!r} does not broadcast onto {a!r} (dim {i})")
        return self._emit(name, a.shape, fn + "(ctx, {}, {})", a, c)

    # --- shapes -----------------------------------------------------------------------------------
    def heads(self, x: Value, n: Any, d: Any, name: str | None = None) -> Value:
        """ne{n·d, T} -> ne{d, n, T}: head h = elements [h·d, (h+1)·d)."""
        self._tensor(x, "heads input")
        n, d = lift(n), lift(d)
        self._check(len(x.shape) == 2 and same(x.dim(0), n * d),
                    f"heads: {x!r} is not {n.describe()} heads of {d.describe()}")
        return self._emit(name or x.name + "_heads", (d, n, x.dim(1)),
                          "ggml_reshape_3d(ctx, {}, " + self.dim(d) + ", " + self.dim(n) + ", T)", x)

    def flatten(self, x: Value, name: str | None = None) -> Value:
        """ne{a, b, T} -> ne{a·b, T} (for the HC state: stream-major, §3.2)."""
        self._tensor(x, "flatten input")
        self._check(len(x.shape) == 3, f"flatten: {x!r} is not 3-D")
        return self._emit(name or x.name + "_flat", (x.dim(0) * x.dim(1), x.dim(2)),
                          "ggml_reshape_2d(ctx, {0}, {0}->ne[0] * {0}->ne[1], {0}->ne[2])", x)

    def reshape(self, x: Value, shape: Sequence[Any], name: str | None = None) -> Value:
        shape = tuple(lift(d) for d in shape)
        self._check(1 <= len(shape) <= 4, "reshape: rank 1 to 4")
        dims = ", ".join(self.dim(d) for d in shape)
        return self._emit(name or x.name + "_r", shape, f"ggml_reshape_{len(shape)}d(ctx, {{}}, {dims})",
                          x, dtype=x.dtype)

    # --- hyper-connections (fused ggml ops, §3.2) ---------------------------------------------------
    def hc_gates(self, mixes: Value, scale: Value, base: Value) -> tuple[Value, Value]:
        """The stream weights of §3.2 steps 4–5 from the first 2·HC mixes, computed together:
        pre[h] = sigmoid(m[h]·scale[0] + base[h]) + hc_eps, post[h] = 2·sigmoid(m[HC+h]·scale[1]
        + base[HC+h]). The mixes are viewed ne{HC, 2, T} so scale[0:2] broadcasts per half."""
        hc = self.model.sym("hc_mult")
        self._check(same(mixes.dim(0), self.model.sym("hc_mix")),
                    f"hc_gates: {mixes!r} are not the HC mixes")
        halves = self._emit("gate_logits", (hc, 2, mixes.dim(1)),
                            "ggml_add(ctx, ggml_mul(ctx, ggml_view_3d(ctx, {0}, hc_mult, 2, {0}->ne[1], "
                            "hc_mult * ggml_element_size({0}), {0}->nb[1], 0), ggml_view_3d(ctx, {1}, 1, 2, 1, "
                            "ggml_element_size({1}), 2 * ggml_element_size({1}), 0)), ggml_view_3d(ctx, {2}, hc_mult, 2, 1, "
                            "hc_mult * ggml_element_size({2}), 2 * hc_mult * ggml_element_size({2}), 0))",
                            mixes, scale, base, comment="ne{HC, 2 (pre, post), T}: m·scale[half] + base")
        self.dims_used.add("hc_mult")
        gates = self._emit("gates", halves.shape, "ggml_sigmoid(ctx, {})", halves)
        # (ggml scales whole contiguous tensors: scale both halves, keep the half each needs)
        pre = self._emit("pre", (hc, mixes.dim(1)),
                         "ggml_view_2d(ctx, ggml_scale_bias(ctx, {0}, 1.0f, hp.hc_eps), hc_mult, {0}->ne[2], "
                         "{0}->nb[2], 0)", gates, comment="sigmoid + eps (§7 #8)")
        post = self._emit("post", (hc, mixes.dim(1)),
                          "ggml_view_2d(ctx, ggml_scale(ctx, {0}, 2.0f), hc_mult, {0}->ne[2], {0}->nb[2], "
                          "{0}->nb[1])", gates, comment="2·sigmoid, no eps")
        return pre, post

    def hc_comb(self, mixes: Value, scale: Value, base: Value, name: str | None = None) -> Value:
        """Sinkhorn-normalised stream mixing ne{dst, src, T} (ggml_dsv4_hc_comb)."""
        hc = self.model.sym("hc_mult")
        return self._emit(name or "comb", (hc, hc, mixes.dim(1)),
                          "ggml_dsv4_hc_comb(ctx, {}, {}, {}, hp.hc_eps, int32_t(hp.hc_sinkhorn_iters))",
                          mixes, scale, base)

    def hc_sum(self, X: Value, weights: Value, name: str | None = None) -> Value:
        """y[:, t] = Σ_h weights[h, t]·X[:, h, t] (ggml_dsv4_hc_pre)."""
        self._tensor(X, "hc_sum state")
        self._check(len(X.shape) == 3, f"hc_sum: {X!r} must be ne{{D, HC, T}}")
        return self._emit(name or "y", (X.dim(0), X.dim(2)), "ggml_dsv4_hc_pre(ctx, {}, {})", X, weights)

    def hc_post(self, f: Value, X: Value, post: Value, comb: Value, name: str | None = None) -> Value:
        """X'[:, d] = post[d]·f + Σ_s comb[d, s]·X[:, s] (ggml_dsv4_hc_post)."""
        self._check(same(f.dim(0), X.dim(0)), f"hc_post: {f!r} does not match the state {X!r}")
        return self._emit(name or "X_next", X.shape, "ggml_dsv4_hc_post(ctx, {}, {}, {}, {})", f, X, post, comb)

    # --- rope ---------------------------------------------------------------------------------------
    def rope(self, x: Value, positions: Value, inverse: bool = False, name: str | None = None) -> Value:
        """Interleaved rope of the last n_rot dims of every head (§3.4.3) with this layer's
        parameters (plain base on ratio-0 layers, compress base + YaRN otherwise); `inverse`
        rotates back (§3.4.6)."""
        self._tensor(x, "rope input")
        self._check(len(x.shape) == 3, f"rope: {x!r} must be ne{{head_dim, heads, tokens}}")
        self._check(positions.dtype == "i32", f"rope: positions {positions!r} must be i32")
        fn = "rope_tail_inverse" if inverse else "rope_tail"
        return self._emit(name or x.name + ("_unrope" if inverse else "_rope"), x.shape,
                          fn + "(ctx, {}, {}, s.rope(il))", x, positions)

    # --- routing / experts ----------------------------------------------------------------------------
    def get_rows(self, table: Value, idx: Value, name: str | None = None) -> Value:
        """Rows (ne1) of `table` picked by i32 indices."""
        self._check(idx.dtype == "i32", f"get_rows: indices {idx!r} must be i32")
        return self._emit(name or table.name + "_rows", (table.dim(0), *idx.shape),
                          "ggml_get_rows(ctx, {}, {})", table, idx, dtype=table.dtype)

    def argsort_top_k(self, x: Value, k: Any, name: str | None = None) -> Value:
        """Indices of the k largest values of each row (i32)."""
        return self._emit(name or x.name + "_top", (lift(k), *x.shape[1:]),
                          "ggml_argsort_top_k(ctx, {}, int(" + self.dim(k) + "))", x, dtype="i32")

    def mul_mat_id(self, w: Value, x: Value, ids: Value, name: str | None = None) -> Value:
        """Expert matmul: w ne{in, out, E}, x ne{in, 1 or K, T}, ids ne{K, T} -> ne{out, K, T}."""
        self._check(len(w.shape) == 3, f"mul_mat_id: {w!r} is not a stack of experts")
        self._check(same(w.dim(0), x.dim(0)), f"mul_mat_id: {w!r} does not take {x!r}")
        self._check(ids.dtype == "i32", f"mul_mat_id: ids {ids!r} must be i32")
        return self._emit(name or w.name, (w.dim(1), ids.dim(0), ids.dim(1)),
                          "ggml_mul_mat_id(ctx, {}, {}, {})", w, x, ids)

    def swiglu_clamp(self, gate: Value, up: Value, limit: Any, name: str | None = None) -> Value:
        """silu(min(gate, L))·clamp(up, −L, L) (§3.8, §7 #11)."""
        self._check(gate.shape is not None and up.shape is not None and len(gate.shape) == len(up.shape)
                    and all(same(a, c) for a, c in zip(gate.shape, up.shape)),
                    f"swiglu_clamp: {gate!r} and {up!r} differ")
        return self._emit(name or "act", gate.shape,
                          "ggml_swiglu_clamp(ctx, {}, {}, " + self.scalar(limit) + ")", gate, up)

    # --- runtime and other blocks -------------------------------------------------------------------
    def call(self, base: str, shape, fmt: str, *args, ctype: str = "ggml_tensor *", dtype: str = "f32",
             comment: str = "") -> Value:
        """A call into the hand-written runtime (native/src/step.h); `fmt` placeholders are args."""
        return self._emit(base, shape, fmt, *args, dtype=dtype, comment=comment, ctype=ctype)

    def invoke(self, block: "Block", *args: Value, variant: str | None = None, name: str | None = None):
        """Calls another generated block: the named variant, or else its dispatcher (which picks
        the variant from the layer's hyperparameters at graph-build time). A block returning a
        struct gives a dict of its fields."""
        if variant is not None:
            fn = block.c_name(block.variant_named(variant))
        else:
            fn = block.name
            block.dispatched = len(block.variants) > 1
        prefix = {"layer": "s, L, il", "model": "s, W", "step": "s"}[block.scope]
        fmt = fn + "(" + prefix + "".join(", {}" for _ in args) + ")"
        out = block.output
        self._check(len(args) == len(block.params),
                    f"invoke {block.name}: {len(args)} arguments for {len(block.params)} parameters")
        for a, (pn, pshape, _, pctype) in zip(args, block.params):
            if pshape is not None and a.shape is not None:
                self._check(len(pshape) == len(a.shape) and all(same(x, y) for x, y in zip(pshape, a.shape)),
                            f"invoke {block.name}: argument {a!r} does not match parameter {pn}{shape_str(pshape)}")
        if out.fields is None:
            return self._emit(name or block.name, out.shape, fmt, *args, dtype=out.dtype, ctype=out.ctype)
        st = self._emit(name or block.name, None, fmt, *args, ctype=out.ctype)
        return self.members(st, out.fields)

    def members(self, st: Value, fields: dict[str, tuple]) -> dict[str, Value]:
        """The fields of a struct value, as values `st.field`."""
        return {k: Member(st, k, tuple(lift(d) for d in shp), dtype) for k, (shp, dtype) in fields.items()}

    # --- step inputs ------------------------------------------------------------------------------
    @property
    def positions(self) -> Value:
        """Absolute positions of the micro-batch tokens, i32 [T]."""
        return Value("positions", (T,), "i32", ref="s.positions", fixed_name=True)

    @property
    def tokens(self) -> Value:
        """Token ids of the micro-batch, i32 [T]."""
        return Value("tokens", (T,), "i32", ref="s.tokens", fixed_name=True)

    # --- compressor pooling (§3.5) -------------------------------------------------------------------
    def compress_pool(self, rows: Value, d: Any, overlap: bool, name: str | None = None) -> Value:
        """u[ch, j] = Σ_m softmax_m(z_m[ch])·v_m[ch] over the members m of block j: a softmax over
        the members of each block, independently per channel (§3.5, §7 #19). With `overlap`
        (ratio 4) the 2r members are the r previous-block tokens, which use features [0, d), then
        the r current-block tokens, features [d, 2d) (§7 #18). `rows` is the runtime's
        CompressorRows (ring and batch rows ne{c·d, ·}, member rows of concat(ring, batch));
        one fused op gathers and pools them (native/ops/ops.h). -> ne{d, nb}."""
        self._check(rows.shape is None, f"compress_pool: {rows!r} must be the runtime's CompressorRows")
        d = lift(d)
        return self._emit(name or "pooled", (d, N_BLOCKS),
                          "ops::compress_pool(ctx, {0}.ring_kv, {0}.kv, {0}.ring_score, {0}.score, {0}.members, "
                          "{0}.n_blocks, " + ("true" if overlap else "false") + ")", rows)

    def entries(self, pooled: Value, name: str | None = None) -> Value:
        """ne{d, nb} -> ne{d, 1, nb}: one single-head entry per block (the shape rope takes)."""
        self._tensor(pooled, "entries input")
        self._check(len(pooled.shape) == 2, f"entries: {pooled!r} must be ne{{d, blocks}}")
        return self._emit(name or "entry", (pooled.dim(0), 1, pooled.dim(1)),
                          "ggml_reshape_3d(ctx, {0}, {0}->ne[0], 1, {0}->ne[1])", pooled)

    # --- experts --------------------------------------------------------------------------------------
    def sum_rows(self, x: Value, name: str | None = None) -> Value:
        self._tensor(x, "sum_rows input")
        return self._emit(name or x.name + "_total", (1, *x.shape[1:]), "ggml_sum_rows(ctx, {})", x)

    def mix_experts(self, outs: Value, weights: Value, name: str | None = None) -> Value:
        """Σ_k weights[k, t]·outs[:, k, t]: ne{D, K, T}, ne{K, T} -> ne{D, T}."""
        self._tensor(outs, "mix_experts outputs")
        self._check(len(outs.shape) == 3 and len(weights.shape) == 2 and same(outs.dim(1), weights.dim(0))
                    and same(outs.dim(2), weights.dim(1)),
                    f"mix_experts: {outs!r} and weights {weights!r} do not match")
        return self._emit(name or "mixed", (outs.dim(0), outs.dim(2)), "mix_experts(ctx, {}, {})", outs, weights)

    def concat(self, a: Value, c: Value, name: str | None = None) -> Value:
        """`a` then `c` along ne0 (every other dimension equal)."""
        self._tensor(a, "concat input")
        self._tensor(c, "concat input")
        self._check(len(a.shape) == len(c.shape) and all(same(x, y) for x, y in zip(a.shape[1:], c.shape[1:])),
                    f"concat: {a!r} and {c!r} differ beyond ne0")
        width = 2 * a.dim(0) if same(a.dim(0), c.dim(0)) else a.dim(0) + c.dim(0)
        return self._emit(name or "joined", (width, *a.shape[1:]), "ggml_concat(ctx, {}, {}, 0)", a, c)

    def repeat_streams(self, e: Value, n: Any, name: str | None = None) -> Value:
        """ne{D, T} -> ne{D, n, T}: the same vector in every stream (§3.1)."""
        self._tensor(e, "repeat_streams input")
        return self._emit(name or "X", (e.dim(0), lift(n), e.dim(1)),
                          "ggml_repeat_4d(ctx, ggml_reshape_3d(ctx, {0}, {0}->ne[0], 1, {0}->ne[1]), {0}->ne[0], "
                          + self.dim(n) + ", {0}->ne[1], 1)", e)


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if depth < 0:
            return False
    return depth == 0


@dataclasses.dataclass
class Output:
    """The result type shared by every variant of a block: a tensor of `shape`, or a struct
    `ctype` with `fields` {name: (shape, dtype)} (the block returns a dict of those)."""

    shape: tuple | None
    dtype: str = "f32"
    ctype: str = "ggml_tensor *"
    fields: dict[str, tuple] | None = None


class Block:
    """A block: a Python function run once per variant into C++ statements."""

    def __init__(self, model: Model, name: str, fn: Callable, spec: str, doc: str,
                 params: list[tuple[str, tuple, str, str]], variants: list[Variant], scope: str,
                 output: Output):
        if scope not in ("layer", "model", "step"):
            raise DslError(f"block '{name}': scope must be layer, model or step")
        self.model = model
        self.name = name
        self.fn = fn
        self.spec = spec
        self.doc = doc
        self.params = params
        self.variants = variants
        self.scope = scope
        self.output = output
        self.dispatched = False    # some caller lets the generated dispatcher pick the variant
        self._built: dict[str, tuple[Builder, Any]] = {}

    @property
    def layered(self) -> bool:
        return self.scope == "layer"

    def variant_named(self, suffix: str) -> Variant:
        for v in self.variants:
            if v.suffix == suffix:
                return v
        raise DslError(f"block '{self.name}' has no variant '{suffix}'")

    def variant_for(self, caller: Variant) -> Variant:
        """The variant matching a caller's attributes (a block with one variant always matches)."""
        if len(self.variants) == 1:
            return self.variants[0]
        for v in self.variants:
            if all(caller.attrs.get(k) == val for k, val in v.attrs.items()):
                return v
        raise DslError(f"block '{self.name}' has no variant for attributes {caller.attrs}")

    def c_name(self, variant: Variant) -> str:
        return self.name + (f"_{variant.suffix}" if variant.suffix else "")

    def build(self, variant: Variant) -> tuple[Builder, Any]:
        """Runs the block function for one variant (once; cached)."""
        if variant.suffix in self._built:
            return self._built[variant.suffix]
        b = Builder(self.model, variant, self.layered)
        args = [b.param(n, shape, dtype, ctype) for n, shape, dtype, ctype in self.params]
        view = (LayerView(self.model, variant.attrs, self.layered, variant.known)
                if self.scope != "step" else None)
        code = self.fn.__code__
        seen: set[int] = set()

        def name_locals(frame):
            for k, v in frame.f_locals.items():
                if isinstance(v, Value) and not v.fixed_name and id(v) not in seen:
                    seen.add(id(v))
                    b.claim(v, k)

        def local_tracer(frame, event, arg):
            if event in ("line", "return"):
                name_locals(frame)
            return local_tracer

        def tracer(frame, event, arg):
            return local_tracer if frame.f_code is code else None

        old = sys.gettrace()
        sys.settrace(tracer)
        try:
            result = self.fn(b, view, *args)
        finally:
            sys.settrace(old)
        self._check_result(result)
        if isinstance(result, Value) and not result.fixed_name and result.name not in seen_named(b):
            b.claim_result(result)
        self._built[variant.suffix] = (b, result)
        return b, result

    def _check_result(self, result: Any) -> None:
        out = self.output
        if out.ctype == "ggml_tensor *":
            if not isinstance(result, Value) or result.shape is None:
                raise DslError(f"block '{self.name}' must return a tensor, got {result!r}")
            if out.shape is not None and (len(out.shape) != len(result.shape) or not all(
                    same(a, c) for a, c in zip(out.shape, result.shape))):
                raise DslError(f"block '{self.name}' returns {result!r}, declared {shape_str(out.shape)}")
        elif out.fields is not None:
            if not isinstance(result, dict) or set(result) != set(out.fields):
                raise DslError(f"block '{self.name}' must return a dict with fields {sorted(out.fields)}")
            for k, (shape, _) in out.fields.items():
                v = result[k]
                if not isinstance(v, Value) or v.shape is None or len(v.shape) != len(shape) or not all(
                        same(a, c) for a, c in zip(shape, v.shape)):
                    raise DslError(f"block '{self.name}' field {k}: {v!r} is not {shape_str(shape)}")


def block_decorator(model: Model, registry: list[Block]):
    """`@block(name, spec, params, output, variants=..., layered=True)` registers a block."""

    def block(name: str, spec: str, params: Sequence[tuple], output: Output,
              variants: Sequence[Variant] | None = None, scope: str = "layer"):
        def wrap(fn: Callable) -> Block:
            if any(b.name == name for b in registry):
                raise DslError(f"block '{name}' declared twice")
            ps = []
            for p in params:
                n, shape, *rest = p
                dtype = rest[0] if rest else "f32"
                ctype = rest[1] if len(rest) > 1 else "ggml_tensor *"
                ps.append((n, tuple(shape) if shape is not None else None, dtype, ctype))
            doc = inspect.getdoc(fn) or ""
            vs = list(variants) if variants else [Variant("", Const(True), {})]
            blk = Block(model, name, fn, spec, doc, ps, vs, scope, output)
            registry.append(blk)
            return blk
        return wrap

    return block
