#define _GNU_SOURCE
// bulk client: connect PORT, send SECS seconds of data, shutdown, read the 8-byte count. Prints bytes.
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
int main(int c,char**v){ int s=socket(AF_INET,SOCK_STREAM,0); struct sockaddr_in a={.sin_family=AF_INET,.sin_port=htons(atoi(v[1]))}; inet_pton(AF_INET,"127.0.0.1",&a.sin_addr);
 if(connect(s,(void*)&a,sizeof a)) return 1; static char buf[262144]; long sent=0; double end=now()+atof(v[2]);
 while(now()<end){ long w=write(s,buf,sizeof buf); if(w<=0) return 1; sent+=w; }
 shutdown(s,SHUT_WR); unsigned long got=0; if(read(s,&got,8)!=8) return 2; if(got!=(unsigned long)sent) {fprintf(stderr,"mismatch %lu %ld\n",got,sent); return 3;} printf("%ld\n",sent); }
