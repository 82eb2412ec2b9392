/*
 * jobworker-init: start one job's program inside its cgroup, its namespaces and its identity.
 *
 * The worker starts this helper as root, with an empty environment, and it does everything
 * that must be in force before the program's first instruction (docs/design.md, "How a job
 * starts"):
 *
 *   monitor (the worker's child, in the worker's cgroup and the host's namespaces)
 *     1.-3. creates the init straight into the job's cgroup and into new PID, mount, IPC
 *        and cgroup namespaces (and a network namespace for a job without network);
 *   init (PID 1 of the job's PID namespace, still root)
 *     4. brings up the loopback of its own network, if it has one, makes every mount private, mounts the job's own /proc (and /sys, read-only, when it
 *        has a network namespace of its own), its own view of the cgroup tree, empty /tmp,
 *        /var/tmp and /dev/shm, and hides the worker's data directory
 *        behind an empty read-only tmpfs that holds only the job's working directory;
 *     5. forks the program;
 *   program (PID 2)
 *     6. drops every supplementary group, takes the job's gid and uid (which clears every
 *        capability), sets no_new_privs and umask 077, changes to the job's directory,
 *        restores default signal handling and execs the program with the job's environment.
 *
 * Signals: HUP, INT, QUIT, USR1, USR2 and TERM sent to the monitor go to the init, and the
 * init sends them to every process of the namespace (kill(-1)), so "SIGTERM to the job"
 * reaches its whole tree and is never ignored because the program is a namespace's PID 1.
 *
 * Exit status: the init writes the program's raw wait status, in decimal, to the job's exit
 * file (created in the exit directory, descriptor 4, named after the job), which outlives any
 * server, then tells the monitor through a pipe and
 * exits, which kills whatever the program left behind in the namespace. If the init is
 * killed first (cgroup.kill), the monitor writes the init's status there instead. The monitor then
 * ends the same way the program did: with its exit code, or killed by its signal (with core
 * dumps off), so the worker reads the program's own status from its child.
 *
 * Errors before the exec are written to the report descriptor as "STAGE ERRNO" (for example
 * "chdir 13"), and the helper exits. A successful exec closes the report descriptor
 * (close-on-exec) without a word, which is how the worker knows the program is running.
 *
 * Usage (the worker's, not a person's), with the report descriptor as fd 3, the directory
 * of exit files as fd 4 (the job's id is CGROUP_DIR's last component), and the program's
 * environment as fd 5, NUL-terminated NAME=VALUE entries to read to its end: it never
 * appears in a command line, which every user of the host may read in /proc:
 *   jobworker-init run CGROUP_DIR UID GID FLAGS DATA_DIR WORK_DIR CWD
 *                  PROGRAM ARGV0 ARG...
 *   jobworker-init check FLAGS
 * FLAGS: "-" or "n" (a network namespace of its own, loopback only). Every descriptor above
 * 4 is closed first, whatever the worker left open.
 *
 * The init is created straight into the job's cgroup and namespaces with
 * clone3(CLONE_INTO_CGROUP | CLONE_NEW*), so no process is ever moved between cgroups (a
 * move waits for an RCU grace period, often milliseconds). Kernels older than 5.7 get the
 * same result the older way: the monitor writes itself into cgroup.procs and unshares.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <net/if.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/sched.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define EXIT_SETUP 125
#define REPORT_FD 3
#define EXIT_FD 4
#define ENV_FD 5

static const int forwarded[] = {SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGTERM};
#define N_FORWARDED (sizeof forwarded / sizeof forwarded[0])

static int report_fd = -1;
static const char *job_id = "";
static volatile pid_t forward_to = 0;

static void report(const char *stage, int err) {
    char line[64];
    int n = snprintf(line, sizeof line, "%s %d", stage, err);
    if (report_fd >= 0 && n > 0) {
        ssize_t ignored = write(report_fd, line, (size_t)n);
        (void)ignored;
    } else {
        fprintf(stderr, "jobworker-init: %s: %s\n", stage, strerror(err));
    }
}

static void fail(const char *stage) {
    report(stage, errno);
    _exit(EXIT_SETUP);
}

static void block_forwarded(int how) {
    sigset_t set;
    sigemptyset(&set);
    for (size_t i = 0; i < N_FORWARDED; i++) sigaddset(&set, forwarded[i]);
    sigprocmask(how, &set, NULL);
}

static void on_forwarded(int sig) {
    int saved = errno;
    if (forward_to != 0) kill(forward_to, sig);
    errno = saved;
}

static void install_forwarding(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_forwarded;
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    for (size_t i = 0; i < N_FORWARDED; i++) sigaction(forwarded[i], &action, NULL);
}

static void loopback_up(void) {
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, "lo", IFNAMSIZ - 1);
    if (sock < 0 || ioctl(sock, SIOCGIFFLAGS, &ifr) < 0) fail("loopback");
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    if (ioctl(sock, SIOCSIFFLAGS, &ifr) < 0) fail("loopback");
    close(sock);
}

static int is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* mkdir -p for absolute paths, as root, 0755. */
static void make_dirs(const char *path) {
    char buf[PATH_MAX];
    size_t len = strlen(path);
    if (len == 0 || len >= sizeof buf) {
        errno = ENAMETOOLONG;
        fail("mkdir");
    }
    memcpy(buf, path, len + 1);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, 0755) < 0 && errno != EEXIST) fail("mkdir");
        *p = '/';
    }
    if (mkdir(buf, 0755) < 0 && errno != EEXIST) fail("mkdir");
}

static void mount_private_tmp(const char *path) {
    if (!is_dir(path)) return;
    if (mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777") < 0) fail("mount-tmp");
}

/* The job's view of the file system (run by the init, in the new mount namespace). */
static void set_up_mounts(const char *data_dir, const char *work_dir, int own_network) {
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) fail("mount-private");
    int work_fd = work_dir ? open(work_dir, O_PATH | O_DIRECTORY | O_CLOEXEC) : -1;
    if (work_dir && work_fd < 0) fail("workdir");
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        fail("mount-proc");
    /* sysfs shows the network devices of the namespace that mounted it. */
    if (own_network && is_dir("/sys") &&
        mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, NULL) < 0)
        fail("mount-sys");
    if (is_dir("/sys/fs/cgroup")) {
        /* The host's hierarchies go (the kernel refuses to mount cgroup2 right on top of a
         * cgroup2 mount), and the job's own cgroup becomes the root of what it sees. */
        if (umount2("/sys/fs/cgroup", MNT_DETACH) < 0 && errno != EINVAL) fail("umount-cgroup");
        if (mount("cgroup2", "/sys/fs/cgroup", "cgroup2",
                  MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, NULL) < 0)
            fail("mount-cgroup");
    }
    mount_private_tmp("/tmp");
    mount_private_tmp("/var/tmp");
    mount_private_tmp("/dev/shm");
    if (data_dir) {
        make_dirs(data_dir);
        if (mount("tmpfs", data_dir, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  "mode=0755,size=64k") < 0)
            fail("mount-data");
        if (work_dir) {
            char source[64];
            snprintf(source, sizeof source, "/proc/self/fd/%d", work_fd);
            make_dirs(work_dir);
            if (mount(source, work_dir, NULL, MS_BIND, NULL) < 0) fail("mount-workdir");
            if (mount(NULL, work_dir, NULL, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV, NULL) < 0)
                fail("mount-workdir");
        }
        if (mount(NULL, data_dir, NULL, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  NULL) < 0)
            fail("mount-data");
    }
    if (work_fd >= 0) close(work_fd);
}

struct job {
    uid_t uid;
    gid_t gid;
    const char *cwd;
    const char *program;
    char **argv;
    char **envp;
};

/* Exec the program: a path as it is, a bare name on the job's PATH (never the working
 * directory). This runs as the job's user, so what it cannot reach it cannot find either,
 * and a caller learns nothing of files only root may see. */
static void exec_search(const struct job *job) {
    if (strchr(job->program, '/')) {
        execve(job->program, job->argv, job->envp);
        fail("exec");
    }
    const char *path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    for (char **entry = job->envp; *entry; entry++) {
        if (strncmp(*entry, "PATH=", 5) == 0) path = *entry + 5;
    }
    int found = ENOENT;
    char candidate[PATH_MAX];
    size_t name = strlen(job->program);
    for (const char *dir = path;;) {
        const char *end = strchr(dir, ':');
        size_t len = end ? (size_t)(end - dir) : strlen(dir);
        if (len > 0 && len + 1 + name < sizeof candidate) {
            memcpy(candidate, dir, len);
            candidate[len] = '/';
            memcpy(candidate + len + 1, job->program, name + 1);
            execve(candidate, job->argv, job->envp);
            /* A directory on PATH the user may not search hides nothing it can run. */
            int unreachable = errno == EACCES && access(candidate, F_OK) != 0;
            if (errno != ENOENT && errno != ENOTDIR && !unreachable) found = errno;
        }
        if (!end) break;
        dir = end + 1;
    }
    errno = found;
    fail("exec");
}

static void exec_program(const struct job *job) {
    for (int sig = 1; sig < NSIG; sig++) signal(sig, SIG_DFL);
    if (setgroups(0, NULL) < 0) fail("setgroups");
    if (setresgid(job->gid, job->gid, job->gid) < 0) fail("setgid");
    if (setresuid(job->uid, job->uid, job->uid) < 0) fail("setuid");
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) fail("no_new_privs");
    umask(077);
    if (chdir(job->cwd) < 0) fail("chdir");
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    exec_search(job);
}

/* Record how the job ended in its exit file; the first writer wins (O_EXCL). */
static void write_exit(int status) {
    char line[32];
    int n = snprintf(line, sizeof line, "%d\n", status);
    int fd = openat(EXIT_FD, job_id, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return;
    ssize_t ignored = write(fd, line, (size_t)n);
    (void)ignored;
    close(fd);
}

/* PID 1 of the job's namespace: start the program, pass its end to the monitor, exit. */
static void run_init(const struct job *job, const char *data_dir, const char *work_dir,
                     int own_network, int status_fd) {
    for (size_t i = 0; i < N_FORWARDED; i++) signal(forwarded[i], SIG_IGN);
    if (own_network) loopback_up();
    set_up_mounts(data_dir, work_dir, own_network);
    pid_t program = fork();
    if (program < 0) fail("fork");
    if (program == 0) {
        close(status_fd);
        exec_program(job);
    }
    close(report_fd);
    report_fd = -1;
    /* kill(-1) from a namespace's PID 1 reaches every process of that namespace only. */
    forward_to = getpid() == 1 ? -1 : program;
    install_forwarding();
    block_forwarded(SIG_UNBLOCK);
    for (;;) {
        int status;
        pid_t pid = wait(&status);
        if (pid == program) {
            write_exit(status);
            ssize_t ignored = write(status_fd, &status, sizeof status);
            (void)ignored;
            _exit(0);
        }
        if (pid < 0 && errno == ECHILD) _exit(0);
    }
}

/* End this process the way the program ended. */
static void mirror(int status) {
    if (WIFEXITED(status)) _exit(WEXITSTATUS(status));
    int sig = WTERMSIG(status);
    struct rlimit no_core = {0, 0};
    setrlimit(RLIMIT_CORE, &no_core);
    signal(sig, SIG_DFL);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, sig);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    kill(getpid(), sig);
    _exit(128 + sig);
}

/* The NUL-terminated entries of ``fd``, read to its end (then closed), as an envp. */
static char **read_environment(int fd) {
    size_t size = 0, room = 4096;
    char *text = malloc(room);
    if (!text) fail("memory");
    for (;;) {
        if (size == room) {
            room *= 2;
            text = realloc(text, room);
            if (!text) fail("memory");
        }
        ssize_t n = read(fd, text + size, room - size);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) fail("environment");
        if (n == 0) break;
        size += (size_t)n;
    }
    close(fd);
    size_t count = 0;
    for (size_t i = 0; i < size; i++) count += text[i] == '\0';
    char **envp = calloc(count + 1, sizeof *envp);
    if (!envp) fail("memory");
    size_t at = 0;
    for (size_t i = 0, start = 0; i < size; i++) {
        if (text[i] == '\0') {
            envp[at++] = text + start;
            start = i + 1;
        }
    }
    return envp;
}

static int namespace_flags(const char *flags) {
    int clone_flags = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWCGROUP;
    if (strchr(flags, 'n')) clone_flags |= CLONE_NEWNET;
    return clone_flags;
}

/* A child in new namespaces (and in the cgroup cgroup_fd, unless it is -1); like fork(). */
static pid_t fork_into(int cgroup_fd, int ns_flags) {
    struct clone_args args;
    memset(&args, 0, sizeof args);
    args.flags = (unsigned long long)ns_flags;
    args.exit_signal = SIGCHLD;
    if (cgroup_fd >= 0) {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = (unsigned long long)cgroup_fd;
    }
    pid_t child = (pid_t)syscall(SYS_clone3, &args, sizeof args);
    if (child >= 0 || (errno != ENOSYS && errno != E2BIG && errno != EINVAL)) return child;
    /* No clone3, or no CLONE_INTO_CGROUP: this process moves into the cgroup itself. */
    if (cgroup_fd >= 0) {
        int procs = openat(cgroup_fd, "cgroup.procs", O_WRONLY | O_CLOEXEC);
        if (procs < 0 || write(procs, "0", 1) < 0) fail("cgroup");
        close(procs);
    }
    if (unshare(ns_flags) < 0) fail("unshare");
    return fork();
}

static int run(int argc, char **argv) {
    if (argc < 11) return 2;
    report_fd = REPORT_FD;
    const char *cgroup_dir = argv[2];
    const char *slash = strrchr(cgroup_dir, '/');
    job_id = slash ? slash + 1 : cgroup_dir;
    struct job job;
    job.uid = (uid_t)strtoul(argv[3], NULL, 10);
    job.gid = (gid_t)strtoul(argv[4], NULL, 10);
    const char *flags = argv[5];
    const char *data_dir = argv[6];
    const char *work_dir = argv[7];
    job.cwd = argv[8];
    job.envp = read_environment(ENV_FD);
    job.program = argv[9];
    job.argv = &argv[10];

    block_forwarded(SIG_BLOCK);
    int cgroup_fd = open(cgroup_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (cgroup_fd < 0) fail("cgroup");
    int status_pipe[2];
    if (pipe2(status_pipe, O_CLOEXEC) < 0) fail("pipe");
    pid_t init = fork_into(cgroup_fd, namespace_flags(flags));
    if (init < 0) fail("fork");
    if (init == 0) {
        close(status_pipe[0]);
        close(cgroup_fd);
        run_init(&job, data_dir, work_dir, strchr(flags, 'n') != NULL, status_pipe[1]);
    }
    close(cgroup_fd);
    close(status_pipe[1]);
    close(report_fd);
    report_fd = -1;
    forward_to = init;
    install_forwarding();
    block_forwarded(SIG_UNBLOCK);

    int program_status = 0;
    size_t got = 0;
    while (got < sizeof program_status) {
        ssize_t n = read(status_pipe[0], (char *)&program_status + got, sizeof program_status - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        got += (size_t)n;
    }
    int init_status = 0;
    while (waitpid(init, &init_status, 0) < 0 && errno == EINTR) {
    }
    if (got != sizeof program_status) {
        /* The init was killed before it could say (cgroup.kill): the job ended that way. */
        write_exit(init_status);
    }
    mirror(got == sizeof program_status ? program_status : init_status);
    return 0;
}

/* Can this host give a job its namespaces and mounts? Exit 0 if so. */
static int check(const char *flags) {
    pid_t child = fork_into(-1, namespace_flags(flags));
    if (child < 0) fail("fork");
    if (child == 0) {
        if (strchr(flags, 'n')) loopback_up();
        set_up_mounts(NULL, NULL, strchr(flags, 'n') != NULL);
        _exit(0);
    }
    int status;
    while (waitpid(child, &status, 0) < 0 && errno == EINTR) {
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : EXIT_SETUP;
}

int main(int argc, char **argv) {
    if (chdir("/") < 0) return EXIT_SETUP;
    if (argc >= 2 && strcmp(argv[1], "run") == 0) {
        /* Nothing but stdio and the report descriptor crosses into the job. */
        if (syscall(SYS_close_range, ENV_FD + 1, ~0U, 0) < 0) {
            for (int fd = ENV_FD + 1; fd < 1024; fd++) close(fd);
        }
        fcntl(REPORT_FD, F_SETFD, FD_CLOEXEC);
        fcntl(EXIT_FD, F_SETFD, FD_CLOEXEC);
    }
    if (argc >= 3 && strcmp(argv[1], "check") == 0) return check(argv[2]);
    if (argc >= 2 && strcmp(argv[1], "run") == 0) return run(argc, argv);
    fprintf(stderr, "jobworker-init is started by the jobworker server, not by hand\n");
    return 2;
}
