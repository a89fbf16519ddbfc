"""Stanford Alpaca's weight-diff tool, same command line:

    python weight_diff.py make_diff --path_raw RAW --path_tuned TUNED --path_diff DIFF
    python weight_diff.py recover --path_raw RAW --path_diff DIFF [--path_tuned OUT] [--device cuda]
                                  [--test_inference] [--check_integrity_naively] [--expected_sum X]

Streams tensor by tensor and checks every tensor against a manifest (see instructune/checkpoint/diff.py).
"""

from instructune.cli import weight_diff_main

if __name__ == "__main__":
    weight_diff_main()
