/*
 * Summary, info and enum from C: the parent registers c_work_seconds{kind="task"} (a summary),
 * c_build{app="demo"} (an info) and c_phase{via} (an enum with states starting, serving,
 * draining), checks the error codes of bad input, then forks argv[1] children one after another.
 * Child w observes the summary w+1 times (0.25 each), sets the info to {version="1.<w>",
 * worker="w<w>"} and the enum to states[1 + w % 2] (c_phase{via="name"} by name,
 * c_phase{via="index"} by index), and tells the parent; the next child starts after that, so the
 * last child set the info and the enum last. Then the parent prints "ready" and every process
 * stays alive until the parent's stdin closes; all exit 0 (1 if a check or a child failed).
 *
 *   cc -O2 -Iinclude examples/c/typed.c -Ltarget/release -lshmetrics -o typed
 *   LD_LIBRARY_PATH=target/release shmetrics run -- ./typed 4 </dev/null
 *
 * With 4 children: c_work_seconds_count 10, c_work_seconds_sum 2.5, the info of worker w3, and
 * both enum series in "draining".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "shmetrics.h"

static const char *const STATES[] = {"starting", "serving", "draining"};

static int die(const char *what) {
    fprintf(stderr, "typed: %s: %s\n", what, shm_last_error());
    return 1;
}

/* 0 if rc is the expected code, else 1 with a message. */
static int expect(const char *what, int rc, int want) {
    if (rc == want)
        return 0;
    fprintf(stderr, "typed: %s returned %d, expected %d (%s)\n", what, rc, want, shm_last_error());
    return 1;
}

/* Errors for bad input, checked before forking; none of them changes a value. */
static int check_errors(shm_summary *work, shm_info *build, shm_enum *phase) {
    int bad = 0;
    const char *kind[] = {"kind"}, *task[] = {"task"};
    shm_summary *s = NULL;
    /* The same name with another number of labels is another definition. */
    bad |= expect("summary again without labels", shm_summary_new("c_work_seconds", "Work.", NULL, NULL, 0, &s),
                  SHM_ERR_CONFLICT);
    bad |= expect("summary with a bad name", shm_summary_new("1work", "Work.", kind, task, 1, &s), SHM_ERR_INVALID);
    bad |= expect("summary with a NULL help", shm_summary_new("c_w", NULL, NULL, NULL, 0, &s), SHM_ERR_ARGUMENT);
    bad |= expect("summary, NULL out", shm_summary_new("c_work_seconds", "Work.", kind, task, 1, NULL),
                  SHM_ERR_ARGUMENT);
    if (s != NULL) {
        fprintf(stderr, "typed: a failed shm_summary_new wrote *out\n");
        bad = 1;
    }
    shm_summary_observe(NULL, 1.0); /* ignored */
    (void)work;

    const char *keys[] = {"1bad"}, *values[] = {"x"};
    bad |= expect("info key 1bad", shm_info_set(build, keys, values, 1), SHM_ERR_INVALID);
    keys[0] = "app"; /* the metric's own label */
    bad |= expect("info key app", shm_info_set(build, keys, values, 1), SHM_ERR_INVALID);
    const char *twice[] = {"version", "version"}, *two[] = {"1", "2"};
    bad |= expect("info key twice", shm_info_set(build, twice, two, 2), SHM_ERR_INVALID);
    bad |= expect("info keys NULL", shm_info_set(build, NULL, values, 1), SHM_ERR_ARGUMENT);
    bad |= expect("info NULL handle", shm_info_set(NULL, NULL, NULL, 0), SHM_ERR_ARGUMENT);

    bad |= expect("enum state lost", shm_enum_set(phase, "lost"), SHM_ERR_INVALID);
    bad |= expect("enum index 3", shm_enum_set_index(phase, 3), SHM_ERR_INVALID);
    bad |= expect("enum state NULL", shm_enum_set(phase, NULL), SHM_ERR_ARGUMENT);
    bad |= expect("enum NULL handle", shm_enum_set_index(NULL, 0), SHM_ERR_ARGUMENT);
    shm_enum *e = NULL;
    const char *dup[] = {"a", "a"};
    bad |= expect("enum with repeated states", shm_enum_new("c_e", "E.", dup, 2, NULL, NULL, 0, &e), SHM_ERR_INVALID);
    bad |= expect("enum without states", shm_enum_new("c_e", "E.", NULL, 0, NULL, NULL, 0, &e), SHM_ERR_INVALID);
    const char *via[] = {"via"}, *name[] = {"name"};
    bad |= expect("enum again with 2 states", shm_enum_new("c_phase", "Phase.", STATES, 2, via, name, 1, &e),
                  SHM_ERR_CONFLICT);
    return bad;
}

static int child(int w, shm_summary *work, shm_info *build, shm_enum *by_name, shm_enum *by_index) {
    for (int i = 0; i <= w; i++)
        shm_summary_observe(work, 0.25);
    char version[16], worker[16];
    snprintf(version, sizeof version, "1.%d", w);
    snprintf(worker, sizeof worker, "w%d", w);
    const char *keys[] = {"version", "worker"}, *values[] = {version, worker};
    size_t state = 1 + (size_t)(w % 2);
    if (shm_info_set(build, keys, values, 2) != SHM_OK)
        return die("shm_info_set");
    if (shm_enum_set(by_name, STATES[state]) != SHM_OK)
        return die("shm_enum_set");
    if (shm_enum_set_index(by_index, state) != SHM_OK)
        return die("shm_enum_set_index");
    /* A failed set leaves the state. */
    return expect("enum state lost (child)", shm_enum_set(by_name, "lost"), SHM_ERR_INVALID);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s WORKERS\n", argv[0]);
        return 2;
    }
    int workers = atoi(argv[1]);
    const char *kind[] = {"kind"}, *task[] = {"task"};
    const char *app[] = {"app"}, *demo[] = {"demo"};
    const char *via[] = {"via"}, *name[] = {"name"}, *index[] = {"index"};
    shm_summary *work;
    shm_info *build;
    shm_enum *by_name, *by_index;
    /* Registered before forking: the children inherit the handles and write their own files. */
    if (shm_summary_new("c_work_seconds", "Work.", kind, task, 1, &work) != SHM_OK)
        return die("c_work_seconds");
    if (shm_info_new("c_build", "Build.", app, demo, 1, &build) != SHM_OK)
        return die("c_build");
    if (shm_enum_new("c_phase", "Phase.", STATES, 3, via, name, 1, &by_name) != SHM_OK ||
        shm_enum_new("c_phase", "Phase.", STATES, 3, via, index, 1, &by_index) != SHM_OK)
        return die("c_phase");
    if (check_errors(work, build, by_name))
        return 1;

    int hold[2]; /* the children wait for EOF on hold[0]: the parent closes hold[1] at the end */
    if (pipe(hold) < 0) {
        perror("pipe");
        return 1;
    }
    int failed = 0;
    for (int w = 0; w < workers && !failed; w++) {
        int done[2];
        if (pipe(done) < 0) {
            perror("pipe");
            return 1;
        }
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            close(hold[1]);
            close(done[0]);
            char ok = child(w, work, build, by_name, by_index) == 0 ? 'y' : 'n';
            if (write(done[1], &ok, 1) != 1)
                exit(1);
            close(done[1]);
            char c;
            while (read(hold[0], &c, 1) > 0) {
            }
            shm_summary_free(work);
            shm_info_free(build);
            shm_enum_free(by_name);
            shm_enum_free(by_index);
            exit(ok == 'y' ? 0 : 1);
        }
        close(done[1]);
        char ok = 'n';
        if (read(done[0], &ok, 1) != 1 || ok != 'y')
            failed = 1;
        close(done[0]);
    }
    close(hold[0]);
    if (!failed) {
        printf("ready\n");
        fflush(stdout);
        char buf[64];
        while (fread(buf, 1, sizeof buf, stdin) > 0) {
        }
    }
    close(hold[1]);
    for (int w = 0; w < workers; w++) {
        int status;
        if (wait(&status) < 0)
            break;
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            failed = 1;
    }
    shm_summary_free(work);
    shm_info_free(build);
    shm_enum_free(by_name);
    shm_enum_free(by_index);
    return failed;
}
