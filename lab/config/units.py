"""Byte units, one name each, for every module that prints or logs a size.

MB and GB are decimal (10^6 and 10^9 bytes): lab.evaluate's `size_mb`, `weights_mb`, `peak_*_mb`, lab.quantize's
index table, the data manifest's summary, lab.bench's `peak_mem_gb`. MiB and GiB are binary (2^20 and 2^30
bytes): read buffers, and lab.bench_data's figures, which follow lab.prepare's `*_mb` settings (they count MiB).
A value is labelled with the name of the constant it was divided by.
"""

MB = 1_000_000
GB = 1_000_000_000
MiB = 1 << 20
GiB = 1 << 30
