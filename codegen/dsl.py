"""A small typed IR that describes a GGUF model: hyperparameters, tensors and (later) blocks.

The IR knows nothing about ggml contexts or memory. It has three parts:

* **Expressions** (`Expr`): integer/float/bool arithmetic over hyperparameters and the per-layer
  index. An expression can be evaluated in Python (`expr.eval(env)`) and printed as C++
  (`expr.cpp()`), so one declaration drives the generated loader and Python-side tools alike.
* **Hyperparameters** (`HParam`): a GGUF key with a value kind (u32, f32, bool, string,
  per-layer array), whether it is required, a default, and value checks.
* **Tensors** (`TensorDecl`): a GGUF name pattern, a shape (ggml `ne` order) in terms of
  hyperparameters, a dtype rule, and a condition saying on which layers it exists.

Misuse (unknown symbols, shape of the wrong rank, a per-layer symbol in a global tensor, ...)
raises `DslError` at declaration time, not when the C++ fails to compile.
"""
from __future__ import annotations

import dataclasses
import enum
import re
from typing import Any, Iterable, Mapping, Sequence


class DslError(Exception):
    """A model description is malformed."""


# ---------------------------------------------------------------------------------------------
# Expressions


class Expr:
    """An expression over hyperparameters; `ty` is 'int', 'float' or 'bool'."""

    ty: str = "int"

    # arithmetic -------------------------------------------------------------------------
    def __add__(self, o): return BinOp("+", self, lift(o))
    def __radd__(self, o): return BinOp("+", lift(o), self)
    def __sub__(self, o): return BinOp("-", self, lift(o))
    def __rsub__(self, o): return BinOp("-", lift(o), self)
    def __mul__(self, o): return BinOp("*", self, lift(o))
    def __rmul__(self, o): return BinOp("*", lift(o), self)
    def __floordiv__(self, o): return BinOp("/", self, lift(o))
    def __rfloordiv__(self, o): return BinOp("/", lift(o), self)
    def __mod__(self, o): return BinOp("%", self, lift(o))
    def __lt__(self, o): return BinOp("<", self, lift(o))
    def __le__(self, o): return BinOp("<=", self, lift(o))
    def __gt__(self, o): return BinOp(">", self, lift(o))
    def __ge__(self, o): return BinOp(">=", self, lift(o))
    def eq(self, o): return BinOp("==", self, lift(o))
    def ne(self, o): return BinOp("!=", self, lift(o))
    def __and__(self, o): return BinOp("&&", self, lift(o))
    def __or__(self, o): return BinOp("||", self, lift(o))
    def __invert__(self): return Not(self)

    def __bool__(self):
        raise DslError("a DSL expression has no Python truth value; use .eq()/.ne() and &, |, ~")

    # interface ---------------------------------------------------------------------------
    def eval(self, env: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def cpp(self, wide: bool = False) -> str:
        """C++ text. Normally symbols read the struct (`hp.n_embd`, `hp.compress_ratios[il]`);
        with `wide` they name int64_t locals of the same name (shape arithmetic, which must not
        overflow 32 bits), which the emitter declares."""
        raise NotImplementedError

    def describe(self) -> str:
        """Human-readable form for error messages, e.g. 'n_head * head_dim'."""
        raise NotImplementedError

    def symbols(self) -> set[str]:
        raise NotImplementedError

    def per_layer(self) -> bool:
        """True when the value depends on the layer index."""
        return any(c.per_layer() for c in self.children())

    def children(self) -> tuple["Expr", ...]:
        return ()

    def __repr__(self) -> str:
        return self.describe()


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Const(Expr):
    value: Any

    @property
    def ty(self) -> str:  # type: ignore[override]
        if isinstance(self.value, bool):
            return "bool"
        return "float" if isinstance(self.value, float) else "int"

    def eval(self, env):
        return self.value

    def cpp(self, wide=False):
        if isinstance(self.value, bool):
            return "true" if self.value else "false"
        if isinstance(self.value, float):
            return repr(self.value) + "f"
        return str(self.value)

    def describe(self):
        return str(self.value)

    def symbols(self):
        return set()


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Sym(Expr):
    """A hyperparameter value. Per-layer symbols are indexed by the current layer `il`."""

    name: str
    sym_ty: str = "int"
    layered: bool = False

    @property
    def ty(self) -> str:  # type: ignore[override]
        return self.sym_ty

    def eval(self, env):
        if self.name not in env:
            raise DslError(f"no value for '{self.name}'")
        v = env[self.name]
        if self.layered:
            return v[env[LAYER.name]]
        return v

    def cpp(self, wide=False):
        if self.name == "il" or wide:
            return self.name
        return f"hp.{self.name}[il]" if self.layered else f"hp.{self.name}"

    def describe(self):
        return self.name

    def symbols(self):
        return {self.name}

    def per_layer(self):
        return self.layered or self.name == "il"


LAYER = Sym("il")  # the layer index inside per-layer declarations

_C_INT_OPS = {"+", "-", "*", "/", "%"}
_CMP_OPS = {"<", "<=", ">", ">=", "==", "!="}


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class BinOp(Expr):
    op: str
    a: Expr
    b: Expr

    @property
    def ty(self) -> str:  # type: ignore[override]
        if self.op in _CMP_OPS or self.op in ("&&", "||"):
            return "bool"
        return "float" if "float" in (self.a.ty, self.b.ty) else "int"

    def __post_init__(self):
        if self.op in ("&&", "||") and (self.a.ty != "bool" or self.b.ty != "bool"):
            raise DslError(f"'{self.op}' needs boolean operands, got {self.a!r} and {self.b!r}")
        if self.op in _C_INT_OPS and "bool" in (self.a.ty, self.b.ty):
            raise DslError(f"arithmetic '{self.op}' on a boolean: {self.a!r}, {self.b!r}")
        if self.op in ("/", "%") and "float" in (self.a.ty, self.b.ty):
            raise DslError(f"integer '{self.op}' on a float: {self.a!r}, {self.b!r}")

    def eval(self, env):
        a, b = self.a.eval(env), self.b.eval(env)
        op = self.op
        if op == "+": return a + b
        if op == "-": return a - b
        if op == "*": return a * b
        if op == "/":
            if b == 0:
                raise DslError(f"division by zero in {self!r}")
            return a // b
        if op == "%":
            if b == 0:
                raise DslError(f"modulo by zero in {self!r}")
            return a % b
        if op == "<": return a < b
        if op == "<=": return a <= b
        if op == ">": return a > b
        if op == ">=": return a >= b
        if op == "==": return a == b
        if op == "!=": return a != b
        if op == "&&": return bool(a) and bool(b)
        if op == "||": return bool(a) or bool(b)
        raise DslError(f"unknown operator {op}")

    def cpp(self, wide=False):
        return f"({self.a.cpp(wide)} {self.op} {self.b.cpp(wide)})"

    def describe(self):
        op = {"/": "//", "&&": "and", "||": "or"}.get(self.op, self.op)
        return f"({self.a.describe()} {op} {self.b.describe()})"

    def symbols(self):
        return self.a.symbols() | self.b.symbols()

    def children(self):
        return (self.a, self.b)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Not(Expr):
    a: Expr

    ty = "bool"

    def __post_init__(self):
        if self.a.ty != "bool":
            raise DslError(f"'~' needs a boolean, got {self.a!r}")

    def eval(self, env):
        return not self.a.eval(env)

    def cpp(self, wide=False):
        return f"!{self.a.cpp(wide)}"

    def describe(self):
        return f"not {self.a.describe()}"

    def symbols(self):
        return self.a.symbols()

    def children(self):
        return (self.a,)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Select(Expr):
    """`cond ? a : b`."""

    cond: Expr
    a: Expr
    b: Expr

    def __post_init__(self):
        if self.cond.ty != "bool":
            raise DslError(f"select needs a boolean condition, got {self.cond!r}")

    @property
    def ty(self) -> str:  # type: ignore[override]
        return "float" if "float" in (self.a.ty, self.b.ty) else self.a.ty

    def eval(self, env):
        return self.a.eval(env) if self.cond.eval(env) else self.b.eval(env)

    def cpp(self, wide=False):
        return f"({self.cond.cpp(wide)} ? {self.a.cpp(wide)} : {self.b.cpp(wide)})"

    def describe(self):
        return f"({self.a.describe()} if {self.cond.describe()} else {self.b.describe()})"

    def symbols(self):
        return self.cond.symbols() | self.a.symbols() | self.b.symbols()

    def children(self):
        return (self.cond, self.a, self.b)


def lift(x: Any) -> Expr:
    if isinstance(x, Expr):
        return x
    if isinstance(x, (bool, int, float)):
        return Const(x)
    raise DslError(f"cannot use {x!r} ({type(x).__name__}) in a DSL expression")


def select(cond: Expr, a: Any, b: Any) -> Expr:
    return Select(lift(cond), lift(a), lift(b))


TRUE = Const(True)


# ---------------------------------------------------------------------------------------------
# Hyperparameters


class Kind(enum.Enum):
    """How a hyperparameter is stored in the GGUF and in the C struct."""

    U32 = "u32"                 # unsigned integer scalar            -> uint32_t
    F32 = "f32"                 # float scalar                       -> float
    BOOL = "bool"               # bool scalar                        -> bool
    STR = "str"                 # string, checked against `choices`  -> (not in the struct)
    INT_ARRAY = "int_array"     # integer array, one per layer       -> int32_t[DSV4_MAX_LAYERS]
    F32_PER_LAYER = "f32_per_layer"  # f32 array of n entries or one f32 -> float[DSV4_MAX_LAYERS]
    U32_PER_LAYER = "u32_per_layer"  # u32 array of n entries or one u32 -> uint32_t[...]
    STR_ARRAY_LEN = "str_array_len"  # array of strings; the value is its length -> uint32_t


_C_TYPES = {
    Kind.U32: "uint32_t", Kind.F32: "float", Kind.BOOL: "bool",
    Kind.INT_ARRAY: "int32_t", Kind.F32_PER_LAYER: "float", Kind.U32_PER_LAYER: "uint32_t",
    Kind.STR_ARRAY_LEN: "uint32_t",
}
_SYM_TYPES = {
    Kind.U32: "int", Kind.F32: "float", Kind.BOOL: "bool", Kind.INT_ARRAY: "int",
    Kind.F32_PER_LAYER: "float", Kind.U32_PER_LAYER: "int", Kind.STR_ARRAY_LEN: "int",
}

_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")


@dataclasses.dataclass(eq=False)
class HParam:
    """A hyperparameter read from a GGUF key."""

    name: str                       # C/Python identifier (struct field)
    key: str                        # GGUF key; '{arch}.' prefix added unless it starts with a known namespace
    kind: Kind
    doc: str
    required: bool = True
    default: Any = None             # used when not required and absent
    fallback: str | None = None     # name of another hparam whose value is used when absent
    choices: tuple | None = None    # allowed values (strings, or per-element values of arrays)
    length: Expr | None = None      # per-layer arrays: exact length (or minimum, see min_length)
    min_length: bool = False        # True: the array must have at least `length` entries
    sym: Sym | None = None

    @property
    def c_type(self) -> str | None:
        return _C_TYPES.get(self.kind)

    @property
    def per_layer(self) -> bool:
        return self.kind in (Kind.INT_ARRAY, Kind.F32_PER_LAYER, Kind.U32_PER_LAYER)

    @property
    def in_struct(self) -> bool:
        return self.kind is not Kind.STR


@dataclasses.dataclass(eq=False)
class Derived:
    """A value computed from other hyperparameters (stored in the struct for convenience)."""

    name: str
    expr: Expr
    doc: str
    sym: Sym | None = None

    @property
    def c_type(self) -> str:
        return {"int": "uint32_t", "float": "float", "bool": "bool"}[self.expr.ty]


@dataclasses.dataclass(eq=False)
class Check:
    """A consistency rule over hyperparameters; violated -> the loader's BAD_KEY error."""

    cond: Expr
    message: str
    keys: tuple[str, ...]           # GGUF keys named in the error
    per_layer: bool = False


# ---------------------------------------------------------------------------------------------
# Tensors


class DType(enum.Enum):
    """Which ggml types a tensor may have in a file."""

    F32 = "f32"             # F32 only (1-D tensors: norms, sinks, HC base/scale, router bias)
    I32 = "i32"             # I32 only (tid2eid)
    FLOAT = "float"         # F32, F16 or BF16 (sensitive small matrices: hc_*_fn, ape)
    WEIGHT = "weight"       # any float or quantized matrix type usable by mul_mat / get_rows


@dataclasses.dataclass(eq=False)
class TensorDecl:
    """One GGUF tensor (per layer when `layered`)."""

    field: str                      # member name in the generated weight struct
    name: str                       # GGUF name; per-layer names contain '{il}'
    shape: tuple[Expr, ...]         # ggml ne order
    dtype: DType
    doc: str
    layered: bool
    when: Expr = TRUE               # condition (may use the layer index and per-layer hparams)
    required: bool = True
    view: tuple[Expr, ...] | None = None  # ne the graph uses (same element count), e.g. wo_a 3-D

    def c_name_format(self) -> str:
        return self.name.replace("{il}", "%d")


# ---------------------------------------------------------------------------------------------
# The model container


class Model:
    """Collects the declarations of one architecture."""

    def __init__(self, arch: str, namespaces: Iterable[str] = ("general.", "tokenizer.")):
        self.arch = arch
        self._namespaces = tuple(namespaces)
        self.hparams: list[HParam] = []
        self.derived: list[Derived] = []
        self.checks: list[Check] = []
        self.tensors: list[TensorDecl] = []
        self.foreign: list[tuple[str, str]] = []   # (family, name pattern): tensors a file may carry, unused
        self._syms: dict[str, Sym] = {LAYER.name: LAYER}
        self.max_layers = 512

    # hyperparameters -----------------------------------------------------------------------
    def full_key(self, key: str) -> str:
        return key if key.startswith(self._namespaces) else f"{self.arch}.{key}"

    def _new_sym(self, name: str, ty: str, layered: bool) -> Sym:
        if not _IDENT.match(name):
            raise DslError(f"'{name}' is not a valid identifier")
        if name in self._syms:
            raise DslError(f"hyperparameter '{name}' declared twice")
        sym = Sym(name, ty, layered)
        self._syms[name] = sym
        return sym

    def hparam(self, name: str, key: str, kind: Kind, doc: str, *, required: bool = True,
               default: Any = None, fallback: Sym | None = None, choices: Sequence | None = None,
               length: Any = None, min_length: bool = False) -> Sym:
        full = self.full_key(key)
        if any(h.key == full for h in self.hparams):
            raise DslError(f"GGUF key '{full}' declared twice")
        if required and (default is not None or fallback is not None):
            raise DslError(f"'{name}': a required key cannot have a default or fallback")
        hp = HParam(name, full, kind, doc, required, default,
                    fallback.name if fallback is not None else None,
                    tuple(choices) if choices is not None else None,
                    lift(length) if length is not None else None, min_length)
        if hp.per_layer and hp.length is None:
            raise DslError(f"'{name}': a per-layer array needs a length")
        if fallback is not None:
            other = self.hparam_by_name(fallback.name)
            if other.kind is not kind:
                raise DslError(f"'{name}': fallback '{fallback.name}' has another kind")
        if kind is Kind.STR and required is False and default is None:
            raise DslError(f"'{name}': an optional string needs a default")
        if kind is not Kind.STR:
            hp.sym = self._new_sym(name, _SYM_TYPES[kind], hp.per_layer)
        else:
            if not _IDENT.match(name):
                raise DslError(f"'{name}' is not a valid identifier")
            hp.sym = None
        self.hparams.append(hp)
        return hp.sym  # type: ignore[return-value]

    def derive(self, name: str, expr: Any, doc: str) -> Sym:
        e = lift(expr)
        self._require_known(e, f"derived '{name}'")
        if e.per_layer():
            raise DslError(f"derived '{name}' cannot depend on the layer")
        d = Derived(name, e, doc)
        d.sym = self._new_sym(name, e.ty, False)
        self.derived.append(d)
        return d.sym

    def check(self, cond: Expr, message: str, *keys: Sym) -> None:
        if not isinstance(cond, Expr) or cond.ty != "bool":
            raise DslError(f"check needs a boolean expression: {message}")
        self._require_known(cond, f"check '{message}'")
        full_keys = []
        for k in keys:
            h = self.hparam_by_name(k.name, allow_derived=True)
            full_keys.append(h.key if isinstance(h, HParam) else h.name)
        self.checks.append(Check(cond, message, tuple(full_keys), cond.per_layer()))

    def hparam_by_name(self, name: str, allow_derived: bool = False):
        for h in self.hparams:
            if h.name == name:
                return h
        if allow_derived:
            for d in self.derived:
                if d.name == name:
                    return d
        raise DslError(f"unknown hyperparameter '{name}'")

    def _require_known(self, e: Expr, what: str) -> None:
        unknown = e.symbols() - set(self._syms)
        if unknown:
            raise DslError(f"{what} uses unknown symbols {sorted(unknown)}")

    # tensors ---------------------------------------------------------------------------------
    def tensor(self, field: str, name: str, shape: Sequence[Any], dtype: DType, doc: str, *,
               when: Any = TRUE, required: bool = True, view: Sequence[Any] | None = None
               ) -> TensorDecl:
        if not _IDENT.match(field):
            raise DslError(f"tensor field '{field}' is not a valid identifier")
        layered = "{il}" in name
        if any(t.field == field and t.layered == layered for t in self.tensors):
            raise DslError(f"tensor field '{field}' declared twice")
        if any(t.name == name for t in self.tensors):
            raise DslError(f"tensor '{name}' declared twice")
        if not 1 <= len(shape) <= 4:
            raise DslError(f"tensor '{name}': rank {len(shape)} (ggml tensors have 1 to 4 dims)")
        shp = tuple(lift(s) for s in shape)
        cond = lift(when)
        if cond.ty != "bool":
            raise DslError(f"tensor '{name}': condition {cond!r} is not boolean")
        for e in (*shp, cond):
            self._require_known(e, f"tensor '{name}'")
            if e.ty != ("bool" if e is cond else "int"):
                raise DslError(f"tensor '{name}': {e!r} has type {e.ty}")
            if not layered and e.per_layer():
                raise DslError(f"tensor '{name}' is global but {e!r} depends on the layer")
        v = None
        if view is not None:
            v = tuple(lift(s) for s in view)
            if len(v) > 4:
                raise DslError(f"tensor '{name}': view rank {len(v)} > 4")
            for e in v:
                self._require_known(e, f"tensor '{name}' view")
        t = TensorDecl(field, name, shp, dtype, doc, layered, cond, required, v)
        self.tensors.append(t)
        return t

    def foreign_family(self, family: str, names: Sequence[str]) -> None:
        """Tensors of another model that files of this architecture are known to carry (e.g. a
        draft head bundled by a converter): the loader accepts and ignores them, `inspect` names
        the family. `{il}` in a name stands for a block number. Names must not collide with the
        model's own tensors; any other unknown tensor stays an error."""
        for name in names:
            if any(t.name == name for t in self.tensors) or any(n == name for _, n in self.foreign):
                raise DslError(f"foreign tensor '{name}' is declared already")
            if name.replace("{il}", "").count("{") or not name:
                raise DslError(f"foreign tensor pattern '{name}': only {{il}} may be a placeholder")
            self.foreign.append((family, name))

    @property
    def global_tensors(self) -> list[TensorDecl]:
        return [t for t in self.tensors if not t.layered]

    @property
    def layer_tensors(self) -> list[TensorDecl]:
        return [t for t in self.tensors if t.layered]

    @property
    def struct_fields(self) -> list:
        return [h for h in self.hparams if h.in_struct] + self.derived

    def sym(self, name: str) -> Sym:
        if name not in self._syms:
            raise DslError(f"unknown symbol '{name}'")
        return self._syms[name]

    # Python-side evaluation (used by tests and tools) -----------------------------------------
    def expected_tensors(self, env: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], DType, bool]]:
        """name -> (ne, dtype rule, required) for a concrete set of hyperparameter values."""
        out: dict[str, tuple[tuple[int, ...], DType, bool]] = {}
        for t in self.global_tensors:
            if t.when.eval(env):
                out[t.name] = (tuple(int(s.eval(env)) for s in t.shape), t.dtype, t.required)
        for il in range(int(env["n_layer_all"])):
            lenv = dict(env)
            lenv[LAYER.name] = il
            for t in self.layer_tensors:
                if t.when.eval(lenv):
                    out[t.name.format(il=il)] = (
                        tuple(int(s.eval(lenv)) for s in t.shape), t.dtype, t.required)
        return out




__all__ = [
    "DslError", "Expr", "Const", "Sym", "BinOp", "Not", "Select", "select", "lift", "LAYER",
    "TRUE", "Kind", "HParam", "Derived", "Check", "DType", "TensorDecl", "Model",
]
