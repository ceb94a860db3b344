#define _GNU_SOURCE
// epoll echo origin on 127.0.0.1:PORT: echoes until EOF, then closes.
#include <arpa/inet.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int c,char**v){ int one=1; int l=socket(AF_INET,SOCK_STREAM|SOCK_NONBLOCK,0); setsockopt(l,SOL_SOCKET,SO_REUSEADDR,&one,sizeof one);
 struct sockaddr_in a={.sin_family=AF_INET,.sin_port=htons(atoi(v[1]))}; inet_pton(AF_INET,"127.0.0.1",&a.sin_addr);
 if(bind(l,(void*)&a,sizeof a)||listen(l,4096)) return 1; int ep=epoll_create1(0);
 struct epoll_event e={.events=EPOLLIN,.data.fd=l}; epoll_ctl(ep,EPOLL_CTL_ADD,l,&e); struct epoll_event ev[64]; static char buf[65536];
 for(;;){ int n=epoll_wait(ep,ev,64,-1); for(int i=0;i<n;i++){ int fd=ev[i].data.fd;
   if(fd==l){ int s; while((s=accept4(l,0,0,SOCK_NONBLOCK))>=0){ setsockopt(s,IPPROTO_TCP,TCP_NODELAY,&one,sizeof one); struct epoll_event ce={.events=EPOLLIN,.data.fd=s}; epoll_ctl(ep,EPOLL_CTL_ADD,s,&ce);} continue; }
   int r=read(fd,buf,sizeof buf); if(r<=0){ close(fd); continue; } int w=0; while(w<r){ int k=write(fd,buf+w,r-w); if(k<=0) break; w+=k; } } } }
