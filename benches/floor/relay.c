/*
 * The floor relay: the least work a user-space TCP relay can do per message,
 * to tell how far below HAProxy any design that moves bytes through user
 * space can get on this kernel (docs/BENCHMARKS.md, "The floor").
 *
 * Not a product: one thread, epoll edge-triggered with every socket
 * registered once for IN|OUT|RDHUP (no epoll_ctl after set-up), a short
 * read taken as "drained" (the trick shardproxy's multishot poll uses), no
 * timers, no clock reads, no logging, no limits, one malloc per connection.
 * Errors close both sides. Good enough for wrk and the e2e bench's clients.
 *
 *   cc -O2 -o relay relay.c && ./relay LISTEN_PORT UPSTREAM_PORT   (127.0.0.1)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 16384

struct half { /* bytes read from `from`, not yet written to `to` */
    char buf[BUF];
    int off, len;
    int eof;  /* `from` sent FIN */
    int shut; /* FIN passed on to `to` */
    int gone; /* an event reported RDHUP/HUP on `from`: read to EOF, no
               * short-read shortcut (no edge follows a FIN already seen) */
};
struct conn {
    int fd[2];          /* 0: downstream (client), 1: upstream */
    int connected;      /* upstream connect completed */
    struct half h[2];   /* h[0]: client -> upstream, h[1]: upstream -> client */
    int dead;
    struct conn *next_dead;
};
struct tag { struct conn *c; int side; };

static struct sockaddr_in up;
static int ep;
static struct conn *graveyard; /* freed after the batch of events */

static void kill_conn(struct conn *c) {
    if (c->dead) return;
    c->dead = 1;
    c->next_dead = graveyard;
    graveyard = c;
    close(c->fd[0]);
    close(c->fd[1]);
}

/* Move bytes from side `s` to the other side. Returns -1 on error. */
static int pump(struct conn *c, int s) {
    struct half *h = &c->h[s];
    int from = c->fd[s], to = c->fd[!s];
    for (;;) {
        if (h->len > h->off) {
            ssize_t n = send(to, h->buf + h->off, h->len - h->off, MSG_NOSIGNAL);
            if (n < 0) return (errno == EAGAIN) ? 0 : -1;
            h->off += n;
            if (h->off < h->len) return 0; /* wait for EPOLLOUT */
        }
        h->off = h->len = 0;
        if (h->eof) {
            if (!h->shut) { shutdown(to, SHUT_WR); h->shut = 1; }
            return 0;
        }
        ssize_t n = recv(from, h->buf, BUF, 0);
        if (n == 0) { h->eof = 1; continue; }
        if (n < 0) return (errno == EAGAIN) ? 0 : -1;
        h->len = n;
        if (n < BUF && !h->gone) {
            /* short read: drained; send it and stop */
            ssize_t w = send(to, h->buf, n, MSG_NOSIGNAL);
            if (w < 0) return (errno == EAGAIN) ? 0 : -1;
            h->off = w;
            return 0;
        }
    }
}

static void on_event(struct tag *t, uint32_t ev) {
    struct conn *c = t->c;
    int s = t->side;
    if (c->dead) return;
    if (ev & EPOLLERR) { kill_conn(c); return; }
    if (ev & (EPOLLRDHUP | EPOLLHUP)) c->h[s].gone = 1;
    if (s == 1 && !c->connected) {
        if (!(ev & EPOLLOUT)) return;
        int err = 0; socklen_t l = sizeof err;
        getsockopt(c->fd[1], SOL_SOCKET, SO_ERROR, &err, &l);
        if (err) { kill_conn(c); return; }
        c->connected = 1;
        /* what the client sent before the connect completed: its edges
         * were ignored, so read it to EAGAIN (or EOF) now */
        int gone = c->h[0].gone;
        c->h[0].gone = 1;
        if (pump(c, 0) < 0) { kill_conn(c); return; }
        c->h[0].gone = gone;
    }
    if (!c->connected) return;
    /* readable: pump from this side; bytes waiting to be written into this
     * side (blocked on a full buffer): flush them and read on */
    if ((ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP)) && pump(c, s) < 0) { kill_conn(c); return; }
    struct half *o = &c->h[!s];
    if ((o->len > o->off || (o->eof && !o->shut)) && pump(c, !s) < 0) { kill_conn(c); return; }
    if (c->h[0].shut && c->h[1].shut) kill_conn(c);
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: relay LISTEN_PORT UPSTREAM_PORT\n"); return 2; }
    int one = 1;
    int l = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[1])) };
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    up = a;
    up.sin_port = htons(atoi(argv[2]));
    if (bind(l, (void *)&a, sizeof a) || listen(l, 4096)) { perror("listen"); return 1; }
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event e = { .events = EPOLLIN, .data.ptr = NULL };
    epoll_ctl(ep, EPOLL_CTL_ADD, l, &e);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            if (!evs[i].data.ptr) {
                int fd;
                while ((fd = accept4(l, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    struct conn *c = calloc(1, sizeof *c + 2 * sizeof(struct tag));
                    struct tag *t = (struct tag *)(c + 1);
                    c->fd[0] = fd;
                    c->fd[1] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    setsockopt(c->fd[1], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    connect(c->fd[1], (void *)&up, sizeof up);
                    for (int s = 0; s < 2; s++) {
                        t[s].c = c; t[s].side = s;
                        struct epoll_event ce = { .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = &t[s] };
                        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd[s], &ce);
                    }
                }
                continue;
            }
            on_event(evs[i].data.ptr, evs[i].events);
        }
        while (graveyard) {
            struct conn *c = graveyard;
            graveyard = c->next_dead;
            free(c);
        }
    }
}
