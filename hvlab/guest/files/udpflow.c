/* hvlab-udp: sequenced UDP (and TCP) flows for hvlab guests, built with gcc -static with the initramfs.
 *
 * busybox cannot pace datagrams or count them reliably, so the guest side of a flow test is this tool.
 * It speaks the format of hvlab/net/traffic.py: payload = "HVFL", flow id u32, seq u64, send time ns u64
 * (big-endian), zero padding up to the size. Over TCP (-T) each record is preceded by its length (u32,
 * big-endian). Counting matches FlowReceiver exactly:
 *   received = records of the flow, unique = distinct seqs, duplicates = received - unique,
 *   reordered = non-duplicates arriving after a higher seq, lost = expected - unique
 *   (expected = -n COUNT if given, else max_seq + 1).
 *
 *   hvlab-udp send -d IP -p PORT [-n COUNT] [-r PPS] [-s SIZE] [-f FLOW] [-b SRCPORT] [-T]
 *   hvlab-udp recv -p PORT [-t SECONDS] [-n COUNT] [-i IDLE] [-B BINDIP] [-T]
 * recv stops after SECONDS, after COUNT distinct records, IDLE seconds after the last record, when the
 * TCP peer closes, or on SIGTERM/SIGINT (a driver that knows the sender has finished stops it that way
 * and still gets the counts). Both print one JSON object on stdout; exit 0 on success, 1 on send errors,
 * 2 on usage/socket errors.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HDR 24
#define MAX_FLOWS 64
#define MAX_SEQ (1ULL << 28) /* bitmap bound: 32 MiB per flow at most */
#define MAX_RECORD 65507

static volatile sig_atomic_t stop_requested;

static void on_stop(int sig) {
    (void)sig;
    stop_requested = 1;
}

static void usage(void) {
    fprintf(stderr,
            "usage: hvlab-udp send -d IP -p PORT [-n COUNT] [-r PPS] [-s SIZE] [-f FLOW] [-b SRCPORT] [-T]\n"
            "       hvlab-udp recv -p PORT [-t SECONDS] [-n COUNT] [-i IDLE] [-B BINDIP] [-T]\n");
    exit(2);
}

static double now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t now_real_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static void put_be32(unsigned char *p, uint32_t v) {
    for (int i = 3; i >= 0; i--) { p[i] = v & 0xff; v >>= 8; }
}
static void put_be64(unsigned char *p, uint64_t v) {
    for (int i = 7; i >= 0; i--) { p[i] = v & 0xff; v >>= 8; }
}
static uint64_t get_be(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

static int write_all(int s, const unsigned char *p, size_t n) {
    while (n) {
        ssize_t w = write(s, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* ---- sending ---- */

static int do_send(const char *dest, int port, long long count, double rate, int size, uint32_t flow,
                   int sport, int tcp) {
    if (size < HDR) size = HDR;
    if (size > MAX_RECORD) size = MAX_RECORD;
    int s = socket(AF_INET, tcp ? SOCK_STREAM : SOCK_DGRAM, 0);
    if (s < 0) { perror("socket"); return 2; }
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, dest, &a.sin_addr) != 1) { fprintf(stderr, "bad address %s\n", dest); return 2; }
    if (sport) {
        struct sockaddr_in b = {.sin_family = AF_INET, .sin_port = htons(sport)};
        if (bind(s, (struct sockaddr *)&b, sizeof b) < 0) { perror("bind"); return 2; }
    }
    if (tcp && connect(s, (struct sockaddr *)&a, sizeof a) < 0) { perror("connect"); return 2; }
    unsigned char *rec = calloc(1, size + 4), *buf = rec + 4;
    put_be32(rec, (uint32_t)size);
    memcpy(buf, "HVFL", 4);
    put_be32(buf + 4, flow);
    long long sent = 0, errors = 0;
    double t0 = now_mono(), period = rate > 0 ? 1.0 / rate : 0;
    for (long long seq = 0; seq < count; seq++) {
        if (period > 0) {
            double due = t0 + seq * period, d = due - now_mono();
            if (d > 0) {
                struct timespec ts = {(time_t)d, (long)((d - (time_t)d) * 1e9)};
                nanosleep(&ts, NULL);
            }
        }
        put_be64(buf + 8, (uint64_t)seq);
        put_be64(buf + 16, now_real_ns());
        int ok = tcp ? write_all(s, rec, size + 4) == 0
                     : sendto(s, buf, size, 0, (struct sockaddr *)&a, sizeof a) == size;
        if (ok) sent++;
        else if (tcp) { errors += count - seq; break; } /* a broken stream loses the rest */
        else errors++;
    }
    if (tcp) shutdown(s, SHUT_WR);
    double elapsed = now_mono() - t0;
    printf("{\"mode\": \"send\", \"flow\": %u, \"sent\": %lld, \"errors\": %lld, \"elapsed\": %.6f}\n", flow,
           sent, errors, elapsed);
    return errors ? 1 : 0;
}

/* ---- counting ---- */

struct flow {
    uint32_t id;
    unsigned char *seen; /* bitmap */
    uint64_t cap;        /* bits */
    long long received, unique, reordered;
    long long max_seq;
};

static struct flow flows[MAX_FLOWS];
static int nflows;
static long long total, invalid, unique_all;

static struct flow *get_flow(uint32_t id) {
    for (int i = 0; i < nflows; i++)
        if (flows[i].id == id) return &flows[i];
    if (nflows == MAX_FLOWS) return NULL;
    struct flow *f = &flows[nflows++];
    memset(f, 0, sizeof *f);
    f->id = id;
    f->max_seq = -1;
    return f;
}

static int mark(struct flow *f, uint64_t seq) { /* 1 if new, 0 if seen, -1 if out of range */
    if (seq >= MAX_SEQ) return -1;
    if (seq >= f->cap) {
        uint64_t cap = f->cap ? f->cap : 65536;
        while (cap <= seq) cap *= 2;
        unsigned char *n = realloc(f->seen, cap / 8);
        if (!n) return -1;
        memset(n + f->cap / 8, 0, (cap - f->cap) / 8);
        f->seen = n;
        f->cap = cap;
    }
    unsigned char bit = 1u << (seq & 7);
    if (f->seen[seq >> 3] & bit) return 0;
    f->seen[seq >> 3] |= bit;
    return 1;
}

static void account(const unsigned char *buf, size_t n) {
    total++;
    if (n < HDR || memcmp(buf, "HVFL", 4) != 0) { invalid++; return; }
    struct flow *f = get_flow((uint32_t)get_be(buf + 4, 4));
    uint64_t seq = get_be(buf + 8, 8);
    if (!f) { invalid++; return; }
    int isnew = mark(f, seq);
    if (isnew < 0) { invalid++; return; }
    f->received++;
    if (isnew) {
        f->unique++;
        unique_all++;
        if ((long long)seq < f->max_seq) f->reordered++;
    }
    if ((long long)seq > f->max_seq) f->max_seq = (long long)seq;
}

/* ---- receiving ---- */

static int do_recv(int port, double seconds, long long expect, double idle, const char *bind_ip, int tcp) {
    int s = socket(AF_INET, tcp ? SOCK_STREAM : SOCK_DGRAM, 0);
    if (s < 0) { perror("socket"); return 2; }
    int one = 1, rcvbuf = 4 << 20;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(s, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (bind_ip && inet_pton(AF_INET, bind_ip, &a.sin_addr) != 1) { fprintf(stderr, "bad bind address\n"); return 2; }
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 2; }
    if (tcp && listen(s, 1) < 0) { perror("listen"); return 2; }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop; /* no SA_RESTART: poll() returns EINTR and the loop ends */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    /* "ready" on stderr so that a driver can start the sender only once the socket is bound */
    fprintf(stderr, "hvlab-udp: listening on %d\n", port);
    fflush(stderr);
    static unsigned char buf[MAX_RECORD + 4 + 65536];
    size_t have = 0; /* TCP: bytes buffered towards the next record */
    int fd = tcp ? -1 : s, eof = 0;
    double end = now_mono() + seconds, last = 0;
    for (;;) {
        if (stop_requested || eof) break;
        if (expect >= 0 && unique_all >= expect) break;
        double t = now_mono(), left = end - t;
        if (idle > 0 && total > 0 && t - last >= idle) break;
        if (idle > 0 && total > 0 && last + idle - t < left) left = last + idle - t;
        if (left <= 0) break;
        struct pollfd p = {.fd = fd >= 0 ? fd : s, .events = POLLIN};
        int r = poll(&p, 1, (int)(left * 1000) + 1);
        if (r < 0 && errno != EINTR) break;
        if (r <= 0) continue;
        if (fd < 0) { /* TCP: the first connection is the flow */
            fd = accept(s, NULL, NULL);
            continue;
        }
        if (!tcp) {
            ssize_t n = recv(s, buf, sizeof buf, 0);
            if (n < 0) continue;
            last = now_mono();
            account(buf, (size_t)n);
            continue;
        }
        ssize_t n = read(fd, buf + have, sizeof buf - have);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) { eof = 1; continue; }
        have += (size_t)n;
        last = now_mono();
        size_t off = 0;
        while (have - off >= 4) {
            uint32_t len = (uint32_t)get_be(buf + off, 4);
            if (len > MAX_RECORD) { eof = 1; invalid++; break; } /* not our framing: give up */
            if (have - off < 4 + len) break;
            account(buf + off + 4, len);
            off += 4 + len;
        }
        memmove(buf, buf + off, have - off);
        have -= off;
    }
    printf("{\"mode\": \"recv\", \"port\": %d, \"datagrams\": %lld, \"invalid\": %lld, \"flows\": [", port, total,
           invalid);
    for (int i = 0; i < nflows; i++) {
        struct flow *f = &flows[i];
        long long exp = expect >= 0 ? expect : f->max_seq + 1;
        long long lost = exp - f->unique;
        if (lost < 0) lost = 0;
        printf("%s{\"flow\": %u, \"received\": %lld, \"unique\": %lld, \"duplicates\": %lld, \"reordered\": %lld, "
               "\"lost\": %lld, \"expected\": %lld, \"max_seq\": %lld}",
               i ? ", " : "", f->id, f->received, f->unique, f->received - f->unique, f->reordered, lost, exp,
               f->max_seq);
    }
    printf("]}\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    const char *mode = argv[1], *dest = NULL, *bind_ip = NULL;
    int port = -1, size = 64, sport = 0, tcp = 0;
    long long count = -1;
    double rate = 1000, seconds = 5, idle = 0;
    uint32_t flow = 1;
    int c;
    optind = 2;
    while ((c = getopt(argc, argv, "d:p:n:r:s:f:b:t:i:B:T")) != -1) {
        switch (c) {
        case 'd': dest = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'n': count = atoll(optarg); break;
        case 'r': rate = atof(optarg); break;
        case 's': size = atoi(optarg); break;
        case 'f': flow = (uint32_t)strtoul(optarg, NULL, 0); break;
        case 'b': sport = atoi(optarg); break;
        case 't': seconds = atof(optarg); break;
        case 'i': idle = atof(optarg); break;
        case 'B': bind_ip = optarg; break;
        case 'T': tcp = 1; break;
        default: usage();
        }
    }
    if (port <= 0 || port > 65535) usage();
    if (!strcmp(mode, "send")) {
        if (!dest) usage();
        return do_send(dest, port, count < 0 ? 1000 : count, rate, size, flow, sport, tcp);
    }
    if (!strcmp(mode, "recv")) return do_recv(port, seconds, count, idle, bind_ip, tcp);
    usage();
    return 2;
}
