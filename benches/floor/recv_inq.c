/* What asking for TCP_INQ costs per read (docs/BENCHMARKS.md, session 19).
 *
 * One loopback TCP connection; each iteration sends 1 KiB on one end and
 * reads it on the other with MSG_DONTWAIT, as the relay does after a poll
 * completion. Modes: 0 recv(2); 1 recvmsg(2) with a TCP_INQ control
 * message (TCP_INQ set on the socket), the relay's read once a side's poll
 * reported POLLPRI; 2 recvmsg(2) without a control buffer. Prints the
 * thread's CPU time per iteration (send + read); compare modes within one
 * run, interleaved.
 *
 *   cc -O2 -o /tmp/recv_inq benches/floor/recv_inq.c
 *   for r in 1 2 3; do for m in 0 1 2; do taskset -c 1 /tmp/recv_inq $m 300000; done; done
 */
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#ifndef TCP_INQ
#define TCP_INQ 36
#endif

static double cpu(void) {
  struct timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: recv_inq MODE(0|1|2) ITERATIONS\n");
    return 2;
  }
  int mode = atoi(argv[1]), n = atoi(argv[2]);
  if (n <= 0 || n > 10000000) n = 300000;
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(0x7f000001);
  socklen_t al = sizeof a;
  int l = socket(AF_INET, SOCK_STREAM, 0);
  if (l < 0 || bind(l, (void *)&a, sizeof a) || listen(l, 1) || getsockname(l, (void *)&a, &al)) {
    perror("listen");
    return 1;
  }
  int c = socket(AF_INET, SOCK_STREAM, 0);
  if (connect(c, (void *)&a, sizeof a)) {
    perror("connect");
    return 1;
  }
  int s = accept(l, 0, 0), one = 1;
  setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (mode == 1) setsockopt(s, IPPROTO_TCP, TCP_INQ, &one, sizeof one);
  static char buf[16384], w[1024];
  memset(w, 'x', sizeof w);
  long short_reads = 0;
  double t0 = cpu();
  for (int i = 0; i < n; i++) {
    if (send(c, w, sizeof w, 0) != (ssize_t)sizeof w) {
      perror("send");
      return 1;
    }
    ssize_t got;
    if (mode == 0) {
      got = recv(s, buf, sizeof buf, MSG_DONTWAIT);
    } else {
      struct iovec iov = {buf, sizeof buf};
      unsigned long long ctl[4];
      struct msghdr m = {0};
      m.msg_iov = &iov;
      m.msg_iovlen = 1;
      if (mode == 1) {
        m.msg_control = ctl;
        m.msg_controllen = sizeof ctl;
      }
      got = recvmsg(s, &m, MSG_DONTWAIT);
    }
    short_reads += got != (ssize_t)sizeof w;
  }
  double t = cpu() - t0;
  printf("mode %d (%s): %.0f ns per send+read, %ld odd reads\n", mode,
         mode == 0 ? "recv" : mode == 1 ? "recvmsg+TCP_INQ" : "recvmsg", t / n * 1e9, short_reads);
  return 0;
}
