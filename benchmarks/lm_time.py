"""Fit + score time of SOURCE at its defaults against kronfluence's EK-FAC on the LM benchmark,
repeated and interleaved (issue #22's time goal: SOURCE no slower than EK-FAC).

    nice -n 10 python benchmarks/lm_time.py                    # every scenario, 5 rounds
    nice -n 10 python benchmarks/lm_time.py --rounds 3 --scenarios classify

One timing of each is noisy here (the same method varies by 20-40% between runs on the shared
2-core machine), so each round times SOURCE once (``lm_lds.source_scores`` at the defaults,
projection seed = round) and EK-FAC once (``lm_lds.kron_methods``: its own process, the time
of its factor fit plus one damping's scoring, measured inside that process, start-up and
imports not counted), alternately, and the table gives medians, the median of the per-round
ratios and its range. One thread per process.
"""

from __future__ import annotations

import argparse
import datetime
import statistics

import lm_lds as bench
import numpy as np
import torch


def run_scenario(name: str, rounds: int) -> dict:
    torch.set_num_threads(1)
    data = bench.scenario_data(name)
    model, trajectory = bench.train_scenario(name, np.arange(data.num_train), bench.FULL_SEED)
    ours, theirs = [], []
    for seed in range(rounds):
        ours.append(bench.timed(lambda: bench.source_scores(model, trajectory, data, {"seed": seed}))[1])
        kron = bench.kron_methods(model, data)
        if not kron:
            raise SystemExit(f"kronfluence's venv is missing ({bench.KRON_PYTHON}): see lm_lds.py")
        theirs.append(statistics.median(seconds for _, seconds in kron.values()))
        print(f"{name}: round {seed}: SOURCE {ours[-1]:.2f} s, EK-FAC {theirs[-1]:.2f} s", flush=True)
    ratios = [a / b for a, b in zip(ours, theirs)]
    return {"scenario": name, "source": ours, "ekfac": theirs, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default=",".join(bench.SCENARIOS))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results = [run_scenario(name, args.rounds) for name in args.scenarios.split(",")]
    lines = [f"# LM benchmark: fit + score time, SOURCE defaults against EK-FAC, {datetime.date.today()}", "",
             f"Machine: {bench.machine()}; torch {torch.__version__}, 1 thread, `nice -n 10`. {args.rounds} rounds, "
             "each timing SOURCE (k = 1024, library defaults, projection seed = round) then kronfluence's EK-FAC "
             "(factor fit + one damping's scoring, the median over its dampings). How it is made: "
             "`benchmarks/lm_time.py`.", "",
             "| scenario | SOURCE median (s) | EK-FAC median (s) | median of per-round ratios | ratio range |",
             "| --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['scenario']} | {statistics.median(r['source']):.2f} | {statistics.median(r['ekfac']):.2f} | "
                     f"{statistics.median(r['ratios']):.2f} | {min(r['ratios']):.2f}-{max(r['ratios']):.2f} |")
    out = bench.ROOT / "results" / f"lm-time-{datetime.date.today()}.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
