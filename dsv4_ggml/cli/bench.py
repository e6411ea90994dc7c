"""`dsv4-ggml bench`: prompt and generation throughput, llama-bench style (the measuring is
dsv4_ggml.bench, imported when the command runs)."""
from __future__ import annotations

from ..cli_options import add_backend_arguments


def add_arguments(b) -> None:
    b.add_argument("-m", "--model", required=True, help="a DeepSeek-V4 .gguf file")
    b.add_argument("-p", "--n-prompt", default="512",
                   help="prompt tokens, or a comma-separated list (e.g. 4096,16384,32768: one pp test each, "
                        "timed in t/s and seconds); 0: skip pp (default 512)")
    b.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens (0: skip tg; default 128)")
    b.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    b.add_argument("-d", "--depth", default="0", help="comma-separated context depths for tg (default 0)")
    b.add_argument("-r", "--repetitions", type=int, default=3, help="timed runs per test (default 3)")
    b.add_argument("--seqs", default=None,
                   help="comma-separated sequence counts, e.g. 1,2,4,8: N sequences prefill -p tokens each "
                        "together, then decode -n tokens each together at each --depth (llama-batched-bench "
                        "style; aggregate t/s, weight bytes read per step and the bandwidth floor)")
    b.add_argument("-b", "--ubatch", type=int, default=512, help="micro-batch size (default 512)")
    b.add_argument("--cache-type", default="f16", help="f32, f16 (default), bf16 or q8_0")
    b.add_argument("--no-flash-attn", action="store_true", help="attention by matmul + softmax")
    add_backend_arguments(b)
    b.add_argument("--bandwidth", type=float, default=None,
                   help="measured memory read bandwidth in GB/s (benchmarks/membw) for the floor")
    b.add_argument("--compute-roof", type=float, default=None, metavar="GMAC/S",
                   help="measured peak multiply-accumulates per second of the matrix unit the weights use "
                        "(benchmarks/computeroof, e.g. its amx_int8 line): pp's fraction of it")
    b.add_argument("--json", action="store_true", help="print JSON")
    b.add_argument("--draft", nargs="?", const="oracle", default=None, metavar="DRAFT.gguf",
                   help="speculative decoding: verify-step cost, oracle drafts at forced acceptance rates "
                        "(100/90/70/50/0%%) and, given a draft model (or 'mtp': the model's MTP block), its "
                        "acceptance and speed")


def run(args) -> int:
    if args.draft is not None:
        from ..bench_draft import run_draft_bench

        run_draft_bench(args.model, None if args.draft == "oracle" else args.draft, n_gen=args.n_gen or 128,
                        threads=args.threads)
        return 0
    from ..bench import main_args

    return main_args(args)
