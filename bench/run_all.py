"""`make bench`: every benchmark in turn (`--quick` for the development-sized variant)."""
import subprocess
import sys

BENCHES = ["bench.reader_bench", "bench.mmoe_paper_bench", "bench.quality_bench", "bench.train_bench", "bench.bf16_auc_bench",
           "bench.ddp_bench", "bench.negative_sampling_bench", "bench.feature_cache_bench", "bench.calibration_bench",
           "bench.esmm_tower_bench", "bench.scoring_bench", "bench.serving_bench", "bench.warm_start_bench",
           "bench.real_bench", "bench.id_embedding_bench"]

if __name__ == "__main__":
    extra = sys.argv[1:]
    for mod in BENCHES:
        print(f"### {mod}", flush=True)
        subprocess.run([sys.executable, "-m", mod, *extra], check=True)
