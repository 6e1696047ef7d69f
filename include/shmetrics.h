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
 * updates and counts them for the aggregator. Update functions that return void ignore a NULL
 * handle; those that return an int (shm_info_set, shm_enum_set, shm_enum_set_index) check their
 * input and refuse a NULL handle with SHM_ERR_ARGUMENT.
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
#define SHM_ERR_INVALID 2  /* bad metric or label name or value, buckets, gauge mode, info key,
                            * enum states, or a state (or index) the enum does not have */
#define SHM_ERR_LABELS 3   /* label values do not match the metric's label names; reserved: every
                            * *_new takes names and values with one n_labels, so another label
                            * set for a registered name is SHM_ERR_CONFLICT */
#define SHM_ERR_CONFLICT 4 /* the name is registered with another type, help, labels or buckets */
#define SHM_ERR_INTERNAL 99

typedef struct ShmCounter shm_counter;
typedef struct ShmGauge shm_gauge;
typedef struct ShmHistogram shm_histogram;
typedef struct ShmSummary shm_summary;
typedef struct ShmInfo shm_info;
typedef struct ShmEnum shm_enum;

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

/* A summary: the count and sum of observations, exposed as name_count and name_sum (no
 * quantiles: they cannot be merged across processes). */
int shm_summary_new(const char *name, const char *help, const char *const *label_names,
                    const char *const *label_values, size_t n_labels, shm_summary **out);
void shm_summary_observe(const shm_summary *s, double v);
void shm_summary_free(shm_summary *s);

/* An info: a set of key/value pairs, exposed as name_info{labels..., keys...} 1 (a trailing
 * "_info" in name is dropped: the exposition adds it); no sample until set. Across processes the
 * value set last by a live process wins. */
int shm_info_new(const char *name, const char *help, const char *const *label_names,
                 const char *const *label_values, size_t n_labels, shm_info **out);
/* Replaces the whole value with the n pairs keys[i]=values[i] (arrays of n strings, NULL if n is
 * 0); each distinct value set is a series of its own in the file. Keys must be valid label
 * names, unique and not among the metric's label names (else SHM_ERR_INVALID, value unchanged);
 * labels and keys together at most 64, values at most 64 KiB. Returns SHM_OK or an error code. */
int shm_info_set(const shm_info *i, const char *const *keys, const char *const *values, size_t n);
void shm_info_free(shm_info *i);

/* An enum (OpenMetrics stateset): states is an array of n_states (at least 1) distinct, non-empty
 * strings; no label may be named like the metric. The series is in the first state until set,
 * exposed as one sample per state, name{labels...,name="state"} 0 or 1. Across processes the
 * state set last by a live process wins. */
int shm_enum_new(const char *name, const char *help, const char *const *states, size_t n_states,
                 const char *const *label_names, const char *const *label_values,
                 size_t n_labels, shm_enum **out);
/* Set the state by name / by its index in states: SHM_OK, or SHM_ERR_INVALID if the enum has no
 * such state (state unchanged), SHM_ERR_ARGUMENT for a NULL handle or state. */
int shm_enum_set(const shm_enum *e, const char *state);
int shm_enum_set_index(const shm_enum *e, size_t i);
void shm_enum_free(shm_enum *e);

/* Non-zero: this process is ready to serve (the aggregator's health check counts it). */
void shm_set_ready(int ready);

/* Why the last failing call on this thread failed ("" if none); valid until the next failure. */
const char *shm_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* SHMETRICS_H */
