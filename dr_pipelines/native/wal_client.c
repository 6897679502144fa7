/*
 * dr-pipelines-wal: the compiled fast path of archive_command and restore_command.
 *
 * PostgreSQL starts a process per WAL file. A Python start plus the imports of the fast path cost
 * ~30 ms, more than the resident agent spends archiving a 16 MB segment; this costs ~1 ms. It does
 * exactly what `dr-pipelines` does before anything heavy is imported (cli/main.py's main and
 * core/wal/fast_path.py, agent_client.py), and hands every other case to `dr-pipelines` beside it,
 * with the same arguments:
 *
 *   wal-fetch: the segment spooled ahead by the agent is renamed into place; else the agent is
 *              asked, and the file it staged is renamed into place (or "not found": exit 1).
 *   wal-push:  a segment archived ahead (its marker matches) returns at once; else the agent is
 *              asked, and 0 is returned only on its "ok": durable on every location.
 *
 * Anything else (no config named, not a running cluster's pg_wal, no agent, an error, a garbled or
 * late answer) runs `dr-pipelines`, which pushes or fetches by itself and starts an agent when none
 * listens. DR_PIPELINES_AGENT tells it what the agent did, so it does not ask again. The agent's
 * socket path is the one agent_client.agent_stem computes: INSTALLATION is compiled in (`./dev
 * setup` builds this per checkout; a moved checkout finds no agent and takes the slow path).
 *
 * Build: cc -O2 -o dr-pipelines-wal wal_client.c -lcrypto -DINSTALLATION='"/path/dr_pipelines/core"'
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/sha.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef INSTALLATION
#error "build with -DINSTALLATION='\"<checkout>/dr_pipelines/core\"' (agent_client.INSTALLATION)"
#endif

#define SPOOL ".dr_pipelines_prefetch"
#define PUSHED ".dr_pipelines_pushed"
#define CONNECT_TIMEOUT_S 2
#define ANSWER_TIMEOUT_S 300 /* as agent_client.ANSWER_TIMEOUT_S: only an agent that hangs hits it */
#define MAX_ANSWER 65536
#define MAX_REQUEST 65536 /* as the agent's MAX_REQUEST: a longer one goes to dr-pipelines */

static char **args;
static int nargs;

/* Run `dr-pipelines` (beside this executable) with our arguments. `outcome` (absent, failed,
 * unusable) and `why` say what the agent did; NULL: it was not asked. Does not return. */
static void slow_path(const char *outcome, const char *why) {
    char self[PATH_MAX], said[4096];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 32);
    if (n >= (ssize_t)sizeof self - 32) n = -1; /* cut off: not a path */
    if (n <= 0 && strchr(args[0], '/') && strlen(args[0]) < sizeof self - 32) /* no /proc: as PostgreSQL named us */
        n = (ssize_t)strlen(strcpy(self, args[0]));
    if (outcome) {
        snprintf(said, sizeof said, "%s\t%s", outcome, why ? why : "");
        setenv("DR_PIPELINES_AGENT", said, 1);
    } else {
        unsetenv("DR_PIPELINES_AGENT");
    }
    if (n > 0) {
        self[n] = '\0';
        char *slash = strrchr(self, '/');
        if (slash) {
            strcpy(slash + 1, "dr-pipelines");
            args[0] = self;
            execv(self, args);
        }
    }
    fprintf(stderr, "dr-pipelines-wal: cannot run dr-pipelines beside %s (%s); PostgreSQL retries\n",
            n > 0 ? self : "this program", strerror(errno));
    exit(1);
}

/* snprintf into an array, or the slow path if it does not fit */
#define FORMAT(buf, ...) \
    do { \
        int n_ = snprintf(buf, sizeof buf, __VA_ARGS__); \
        if (n_ < 0 || (size_t)n_ >= sizeof buf) slow_path(NULL, NULL); \
    } while (0)

/* ------------------------------------------------------------------ paths */

static int normalized(const char *p) {
    /* what os.path.abspath would leave as it is: no "//", "/./", "/../", no trailing "/" */
    size_t len = strlen(p);
    if (len == 0 || p[0] != '/' || (len > 1 && p[len - 1] == '/')) return 0;
    if (strstr(p, "//") || strstr(p, "/./") || strstr(p, "/../")) return 0;
    if ((len >= 2 && strcmp(p + len - 2, "/.") == 0) || (len >= 3 && strcmp(p + len - 3, "/..") == 0)) return 0;
    return 1;
}

/* os.path.abspath of `p` into `out`; 0 if it would need normalising (the slow path does that). */
static int abspath(const char *p, char *out, size_t size) {
    if (p[0] == '/') {
        if (strlen(p) >= size) return 0;
        strcpy(out, p);
    } else {
        char cwd[PATH_MAX];
        if (!getcwd(cwd, sizeof cwd)) return 0;
        if ((size_t)snprintf(out, size, "%s/%s", strcmp(cwd, "/") == 0 ? "" : cwd, p) >= size) return 0;
    }
    return normalized(out);
}

/* Path(p).parent, and its last part, as Python has them for these simple paths */
static void split(const char *p, char *parent, char *name) {
    const char *slash = strrchr(p, '/');
    if (!slash) {
        strcpy(parent, ".");
        strcpy(name, p);
    } else if (slash == p) {
        strcpy(parent, "/");
        strcpy(name, slash + 1);
    } else {
        memcpy(parent, p, (size_t)(slash - p));
        parent[slash - p] = '\0';
        strcpy(name, slash + 1);
    }
}

static int fsync_dir(const char *dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

/* ------------------------------------------------------------------ arguments (fast_path.py) */

static const char *option(const char *flag) {
    size_t len = strlen(flag);
    for (int i = 1; i < nargs; i++) {
        if (strcmp(args[i], flag) == 0 && i + 1 < nargs) return args[i + 1];
        if (strncmp(args[i], flag, len) == 0 && args[i][len] == '=') return args[i] + len + 1;
    }
    return NULL;
}

static int command_index(const char *command) {
    for (int i = 1; i < nargs; i++)
        if (strcmp(args[i], command) == 0) return i;
    return -1;
}

static int positionals(int from, const char **out, int max) {
    int n = 0, skip = 0;
    for (int i = from + 1; i < nargs && n < max; i++) {
        if (skip)
            skip = 0;
        else if (strcmp(args[i], "--db") == 0 || strcmp(args[i], "--location") == 0)
            skip = 1;
        else if (args[i][0] != '-')
            out[n++] = args[i];
    }
    return n;
}

/* fast_path.push_context: the config (path, size, change time) and the database */
static int push_context(char *out, size_t size) {
    const char *config = option("--config");
    if (!config || !*config) config = getenv("DR_PIPELINES_CONFIG");
    if (!config || !*config) return 0; /* the sandbox: the slow path */
    char path[PATH_MAX];
    struct stat st;
    if (!abspath(config, path, sizeof path) || stat(path, &st) != 0) return 0;
    const char *db = option("--db");
    long long mtime_ns = (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
    return (size_t)snprintf(out, size, "%s|%lld|%lld|%s", path, (long long)st.st_size, mtime_ns, db ? db : "None") <
           size;
}

/* ------------------------------------------------------------------ the agent (agent_client.py) */

/* Append printf-style text at *o in buf, or take the slow path if it does not fit: a request cut
 * short could ask the agent about another file, or with fewer locations. */
static void append(char *buf, size_t size, size_t *o, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = *o < size ? vsnprintf(buf + *o, size - *o, fmt, ap) : -1;
    va_end(ap);
    if (n < 0 || (size_t)n >= size - *o) slow_path(NULL, NULL);
    *o += (size_t)n;
}

/* `s` as a JSON string appended to the request (whole, or the slow path) */
static void append_json_string(char *buf, size_t size, size_t *o, const char *s) {
    append(buf, size, o, "\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            append(buf, size, o, "\\%c", c);
        else if (c < 0x20)
            append(buf, size, o, "\\u%04x", c);
        else
            append(buf, size, o, "%c", c);
    }
    append(buf, size, o, "\"");
}

/* The socket of the agent for the cluster whose pg_wal holds `abs_path`; 0 if there is no running
 * cluster's pg_wal there (the slow path decides). Leaves through the slow path for a directory
 * that is not ours alone, or none yet. */
static int agent_socket(const char *abs_path, const char *context, char *out, size_t size) {
    char pg_wal[PATH_MAX], name[PATH_MAX], data_dir[PATH_MAX], pid_file[PATH_MAX + 32], real[PATH_MAX];
    split(abs_path, pg_wal, name);
    split(pg_wal, data_dir, name);
    struct stat st;
    FORMAT(pid_file, "%s/postmaster.pid", data_dir);
    if (strcmp(name, "pg_wal") != 0 || stat(pid_file, &st) != 0 || !S_ISREG(st.st_mode)) return 0;
    if (!realpath(pg_wal, real)) return 0;

    char dir[64];
    snprintf(dir, sizeof dir, "/tmp/dr_pipelines-%u", (unsigned)geteuid());
    if (lstat(dir, &st) != 0) slow_path("absent", NULL);
    if (!S_ISDIR(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & 077) != 0) {
        char why[256];
        snprintf(why, sizeof why, "%s is not a private directory of this user; not using the archiver agent", dir);
        slow_path("unusable", why);
    }
    size_t lr = strlen(real), lc = strlen(context), li = strlen(INSTALLATION);
    unsigned char *key = malloc(lr + lc + li + 2), digest[SHA256_DIGEST_LENGTH];
    if (!key) return 0;
    memcpy(key, real, lr);
    key[lr] = '\0';
    memcpy(key + lr + 1, context, lc);
    key[lr + 1 + lc] = '\0';
    memcpy(key + lr + lc + 2, INSTALLATION, li);
    SHA256(key, lr + lc + li + 2, digest);
    free(key);
    char hex[33];
    for (int i = 0; i < 16; i++) snprintf(hex + 2 * i, 3, "%02x", digest[i]);
    return (size_t)snprintf(out, size, "%s/agent-%s.sock", dir, hex) < size;
}

/* Send `request`, return the one-line answer (without its newline) in `answer`. Leaves through the
 * slow path if no agent listens, or it dies or hangs mid-request. */
static void ask(const char *sock_path, const char *request, char *answer, size_t size) {
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (s < 0 || strlen(sock_path) >= sizeof addr.sun_path) slow_path("absent", NULL);
    strcpy(addr.sun_path, sock_path);
    struct timeval t = {.tv_sec = CONNECT_TIMEOUT_S};
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &t, sizeof t);
    if (connect(s, (struct sockaddr *)&addr, sizeof addr) != 0) slow_path("absent", NULL); /* none, stale, hung */
    t.tv_sec = ANSWER_TIMEOUT_S;
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &t, sizeof t);
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &t, sizeof t);
    size_t len = strlen(request), sent = 0, got = 0;
    while (sent < len) {
        ssize_t n = send(s, request + sent, len - sent, MSG_NOSIGNAL);
        if (n <= 0) slow_path("failed", "the archiver agent did not answer (it closed the connection)");
        sent += (size_t)n;
    }
    while (got == 0 || answer[got - 1] != '\n') {
        if (got + 1 >= size) slow_path("failed", "the archiver agent's answer is too long");
        ssize_t n = recv(s, answer + got, size - 1 - got, 0);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            unlink(sock_path); /* hung: later calls must not wait on it too (it exits without its socket) */
            slow_path("failed", "the archiver agent did not answer (TimeoutError: timed out)");
        }
        if (n <= 0) slow_path("failed", "the archiver agent did not answer (the connection closed without an answer)");
        if (memchr(answer + got, '\0', (size_t)n)) slow_path("failed", "the archiver agent's answer holds a NUL byte");
        got += (size_t)n;
    }
    close(s);
    answer[got - 1] = '\0';
}

static void failed_answer(const char *answer) {
    char why[4096];
    if (strncmp(answer, "error ", 6) == 0)
        snprintf(why, sizeof why, "the archiver agent failed: %s", answer + 6);
    else
        snprintf(why, sizeof why, "the archiver agent answered %.200s", answer);
    slow_path("failed", why);
}

/* ------------------------------------------------------------------ the two commands */

static int wal_push(const char *path) {
    char context[2 * PATH_MAX], abs_path[PATH_MAX], parent[PATH_MAX], name[PATH_MAX], marker[2 * PATH_MAX];
    if (!push_context(context, sizeof context) || !abspath(path, abs_path, sizeof abs_path)) slow_path(NULL, NULL);

    /* archived ahead by an earlier call (fast_path.take_pushed): the marker matches the segment */
    split(path, parent, name);
    FORMAT(marker, "%s/" PUSHED "/%s", parent, name);
    int fd = open(marker, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        char recorded[4 * PATH_MAX], expected[4 * PATH_MAX], hex[81] = "";
        ssize_t n = read(fd, recorded, sizeof recorded - 1);
        close(fd);
        int seg = open(path, O_RDONLY | O_CLOEXEC);
        struct stat st;
        unsigned char head[40];
        ssize_t h = seg >= 0 ? read(seg, head, sizeof head) : -1;
        if (n < 0 || seg < 0 || h < 0 || fstat(seg, &st) != 0) slow_path(NULL, NULL);
        close(seg);
        for (ssize_t i = 0; i < h; i++) snprintf(hex + 2 * i, 3, "%02x", head[i]);
        recorded[n] = '\0';
        FORMAT(expected, "%lld %s %s", (long long)st.st_size, hex, context);
        if (unlink(marker) != 0) slow_path(NULL, NULL);
        if (strcmp(recorded, expected) == 0) return 0;
    } else if (errno != ENOENT && errno != ENOTDIR) {
        slow_path(NULL, NULL);
    }

    char sock_path[sizeof((struct sockaddr_un *)0)->sun_path], request[MAX_REQUEST], answer[MAX_ANSWER];
    size_t o = 0;
    if (!agent_socket(abs_path, context, sock_path, sizeof sock_path)) slow_path(NULL, NULL);
    append(request, sizeof request, &o, "{\"push\": ");
    append_json_string(request, sizeof request, &o, abs_path);
    append(request, sizeof request, &o, ", \"context\": ");
    append_json_string(request, sizeof request, &o, context);
    append(request, sizeof request, &o, ", \"answer\": \"text\"}\n");
    ask(sock_path, request, answer, sizeof answer);
    if (strcmp(answer, "ok") == 0) return 0; /* durable on every location */
    failed_answer(answer);
    return 1;
}

static int wal_fetch(const char *name, const char *dest) {
    char parent[PATH_MAX], base[PATH_MAX], src[3 * PATH_MAX];

    /* spooled ahead of replay (fast_path.take_prefetched) */
    if (strlen(dest) >= PATH_MAX || strlen(name) >= PATH_MAX) slow_path(NULL, NULL);
    split(dest, parent, base);
    FORMAT(src, "%s/" SPOOL "/%s", parent, name);
    if (rename(src, dest) == 0) {
        if (fsync_dir(parent) != 0) slow_path(NULL, NULL);
        return 0;
    }
    if (errno != ENOENT) slow_path(NULL, NULL);

    char context[2 * PATH_MAX], abs_dest[PATH_MAX], abs_parent[PATH_MAX], sock_path[108];
    if (!push_context(context, sizeof context) || !abspath(dest, abs_dest, sizeof abs_dest)) slow_path(NULL, NULL);
    if (!agent_socket(abs_dest, context, sock_path, sizeof sock_path)) slow_path(NULL, NULL);

    char request[MAX_REQUEST], answer[MAX_ANSWER];
    size_t o = 0;
    append(request, sizeof request, &o, "{\"fetch\": ");
    append_json_string(request, sizeof request, &o, name);
    append(request, sizeof request, &o, ", \"dest\": ");
    append_json_string(request, sizeof request, &o, abs_dest);
    append(request, sizeof request, &o, ", \"context\": ");
    append_json_string(request, sizeof request, &o, context);
    append(request, sizeof request, &o, ", \"answer\": \"text\"");
    int first = 1;
    for (int i = 1; i < nargs; i++) {
        const char *loc = NULL;
        if (strcmp(args[i], "--location") == 0 && i + 1 < nargs)
            loc = args[i + 1];
        else if (strncmp(args[i], "--location=", 11) == 0)
            loc = args[i] + 11;
        if (!loc) continue;
        append(request, sizeof request, &o, first ? ", \"locations\": [" : ", ");
        append_json_string(request, sizeof request, &o, loc);
        first = 0;
    }
    if (!first) append(request, sizeof request, &o, "]");
    if (command_index("--partial") > 0) append(request, sizeof request, &o, ", \"partial\": true");
    append(request, sizeof request, &o, "}\n");
    ask(sock_path, request, answer, sizeof answer);

    if (strncmp(answer, "not_found ", 10) == 0) { /* restore_command's "not found": recovery decides */
        fprintf(stderr, "%s\n", answer + 10);
        return 1;
    }
    if (strncmp(answer, "ok ", 3) != 0) failed_answer(answer);
    /* the file the agent staged: a name of this request's own in the spool, renamed into place */
    const char *staged = answer + 3;
    char staged_parent[PATH_MAX], staged_name[PATH_MAX], spool[PATH_MAX + 32], prefix[PATH_MAX], why[4096];
    split(abs_dest, abs_parent, base);
    FORMAT(spool, "%s/" SPOOL, abs_parent);
    FORMAT(prefix, ".%s.fetched-", name);
    if (strlen(staged) >= PATH_MAX || strchr(staged, '/') == NULL) failed_answer(answer);
    split(staged, staged_parent, staged_name);
    if (strcmp(staged_parent, spool) != 0 || strncmp(staged_name, prefix, strlen(prefix)) != 0) {
        snprintf(why, sizeof why, "the archiver agent answered %.300s, not a file of its spool", staged);
        slow_path("failed", why);
    }
    if (rename(staged, dest) != 0 || fsync_dir(parent) != 0) {
        snprintf(why, sizeof why, "the file the archiver agent fetched could not be put in place (%s)", strerror(errno));
        slow_path("failed", why);
    }
    return 0;
}

int main(int argc, char **argv) {
    args = argv;
    nargs = argc;
    if (argc == 2 && strcmp(argv[1], "--installation") == 0) { /* pg_config.wal_command: built for this checkout? */
        puts(INSTALLATION);
        return 0;
    }
    const char *found[2];
    int i;
    if ((i = command_index("wal-fetch")) > 0 && positionals(i, found, 2) == 2) return wal_fetch(found[0], found[1]);
    if ((i = command_index("wal-push")) > 0 && positionals(i, found, 1) == 1) return wal_push(found[0]);
    slow_path(NULL, NULL);
}
