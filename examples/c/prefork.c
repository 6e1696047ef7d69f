/*
 * A pre-fork "server" in C: forks argv[1] children; each increments c_requests_total{worker}
 * argv[2] times (and observes c_latency_seconds), declares itself ready, and exits normally.
 * The parent waits for them all and exits 0 (1 if a child failed).
 *
 *   cc -O2 -Iinclude examples/c/prefork.c -Ltarget/release -lshmetrics -o prefork
 *   LD_LIBRARY_PATH=target/release shmetrics run -- ./prefork 4 1000
 *
 * The job-wide total is c_requests_total summed over workers = argv[1] * argv[2].
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "shmetrics.h"

static int die(const char *what) {
    fprintf(stderr, "prefork: %s: %s\n", what, shm_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s WORKERS INCREMENTS\n", argv[0]);
        return 2;
    }
    int workers = atoi(argv[1]);
    long incs = atol(argv[2]);
    const double buckets[] = {0.01, 0.1, 1.0};
    shm_histogram *latency;
    /* Registered before forking: the children inherit the handle and write their own files. */
    if (shm_histogram_new("c_latency_seconds", "Latency.", buckets, 3, NULL, NULL, 0, &latency) != SHM_OK)
        return die("c_latency_seconds");
    for (int w = 0; w < workers; w++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            char id[16];
            snprintf(id, sizeof id, "%d", w);
            const char *names[] = {"worker"};
            const char *values[] = {id};
            shm_counter *requests;
            if (shm_counter_new("c_requests", "Requests.", names, values, 1, &requests) != SHM_OK)
                exit(die("c_requests"));
            for (long i = 0; i < incs; i++) {
                shm_counter_inc(requests, 1);
                shm_histogram_observe(latency, 0.05);
            }
            shm_set_ready(1);
            shm_counter_free(requests);
            exit(0);
        }
    }
    int failed = 0;
    for (int w = 0; w < workers; w++) {
        int status;
        if (wait(&status) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
            failed = 1;
    }
    shm_histogram_free(latency);
    return failed;
}
