/*
 * shmetrics — the C ABI of the native writer.
 *
 * A process writes its metrics into its own file in $SHMETRICS_DIR (private memory when unset);
 * one aggregator (`shmetrics serve` or `shmetrics run -- CMD`) merges every process's file into
 * one job-wide /metrics. Build against the library `cargo build --release` leaves in
 * target/release: libshmetrics.so (link with -lshmetrics) or libshmetrics.a (add
 * -lpthread -ldl -lm).
 *
 * Handles: each *_new function registers the metric (or finds it, if registered the same way
 * before) and returns the handle of one series (one set of label values). Updating through a
 * handle is one atomic operation on shared memory: no lock, no allocation, no syscall. Free a
 * handle once with its *_free function; the series stays.
 *
 * Errors: *_new functions return SHM_OK or an error code and leave *out untouched on error;
 * shm_last_error() says why (per thread). Nothing aborts the process: a full file or disk drops
 * updates and counts them for the aggregator. Update functions ignore a NULL handle.
 *
 * Threads and fork: every function may be called from any thread. After fork(), handles keep
 * working in the child, which gets a file of its own (its updates are not counted twice); exit()
 * marks the file as cleanly exited (a process killed by a signal is reported as a crash).
 *
 * Strings are NUL-terminated UTF-8. label_names and label_values are arrays of n_labels strings
 * (NULL if n_labels is 0). Names follow Prometheus' rules; a counter's name is given without
 * "_total", which the exposition adds.
 */
#ifndef SHMETRICS_H
#define SHMETRICS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SHM_OK 0
#define SHM_ERR_ARGUMENT 1 /* a required pointer is NULL, or a string is not UTF-8 */
#define SHM_ERR_INVALID 2  /* bad metric or label name or value, buckets, gauge mode */
#define SHM_ERR_LABELS 3   /* label values do not match the metric's label names */
#define SHM_ERR_CONFLICT 4 /* the name is registered with another type, help, labels or buckets */
#define SHM_ERR_INTERNAL 99

typedef struct ShmCounter shm_counter;
typedef struct ShmGauge shm_gauge;
typedef struct ShmHistogram shm_histogram;

int shm_counter_new(const char *name, const char *help, const char *const *label_names,
                    const char *const *label_values, size_t n_labels, shm_counter **out);
void shm_counter_inc(const shm_counter *c, uint64_t v);
void shm_counter_free(shm_counter *c);

/* mode: "sum", "max", "min", "mostrecent", "all", or "live" + one of them ("livesum", …): how
 * the processes' values are merged; live* modes drop the values of dead processes. */
int shm_gauge_new(const char *name, const char *help, const char *mode,
                  const char *const *label_names, const char *const *label_values,
                  size_t n_labels, shm_gauge **out);
void shm_gauge_set(const shm_gauge *g, double v);
void shm_gauge_add(const shm_gauge *g, double v);
/* Raise to v if larger / lower to v if smaller, atomically (uWSGI's metric_set_max/min). */
void shm_gauge_set_max(const shm_gauge *g, double v);
void shm_gauge_set_min(const shm_gauge *g, double v);
void shm_gauge_free(shm_gauge *g);

/* buckets: n_buckets finite, strictly increasing upper bounds (+Inf is implied). */
int shm_histogram_new(const char *name, const char *help, const double *buckets, size_t n_buckets,
                      const char *const *label_names, const char *const *label_values,
                      size_t n_labels, shm_histogram **out);
void shm_histogram_observe(const shm_histogram *h, double v);
void shm_histogram_free(shm_histogram *h);

/* Non-zero: this process is ready to serve (the aggregator's health check counts it). */
void shm_set_ready(int ready);

/* Why the last failing call on this thread failed ("" if none); valid until the next failure. */
const char *shm_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* SHMETRICS_H */
