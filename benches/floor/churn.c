#define _GNU_SOURCE
// 4 threads: connect, write 1 KiB, read 1 KiB, close; for SECS seconds. Prints connections.
#include <arpa/inet.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
static int port, secs; static long total;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
static void *w(void *a){ (void)a; char msg[1024], back[1024]; long n=0; double end=now()+secs; int one=1;
  for(int i=0;i<1024;i++) msg[i]=0x17;
  struct sockaddr_in sa={.sin_family=AF_INET,.sin_port=htons(port)}; inet_pton(AF_INET,"127.0.0.1",&sa.sin_addr);
  while(now()<end){ int s=socket(AF_INET,SOCK_STREAM,0); if(connect(s,(void*)&sa,sizeof sa)){perror("connect");exit(1);}
    setsockopt(s,IPPROTO_TCP,TCP_NODELAY,&one,sizeof one);
    if(write(s,msg,1024)!=1024){perror("write");exit(1);}
    int got=0; while(got<1024){int r=read(s,back+got,1024-got); if(r<=0){perror("read");exit(1);} got+=r;}
    close(s); n++; }
  pthread_mutex_lock(&mu); total+=n; pthread_mutex_unlock(&mu); return 0; }
int main(int c,char**v){ port=atoi(v[1]); secs=atoi(v[2]); pthread_t t[4]; for(int i=0;i<4;i++) pthread_create(&t[i],0,w,0); for(int i=0;i<4;i++) pthread_join(t[i],0); printf("%ld\n",total); }
