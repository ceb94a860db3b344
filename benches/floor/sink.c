#define _GNU_SOURCE
// sink origin: per connection (sequential), count bytes to EOF, answer the count (8 bytes LE).
#include <arpa/inet.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int c,char**v){ int one=1,l=socket(AF_INET,SOCK_STREAM,0); setsockopt(l,SOL_SOCKET,SO_REUSEADDR,&one,sizeof one);
 struct sockaddr_in a={.sin_family=AF_INET,.sin_port=htons(atoi(v[1]))}; inet_pton(AF_INET,"127.0.0.1",&a.sin_addr);
 if(bind(l,(void*)&a,sizeof a)||listen(l,128)) return 1; static char buf[262144];
 for(;;){ int s=accept(l,0,0); unsigned long n=0; long r; while((r=read(s,buf,sizeof buf))>0) n+=r; write(s,&n,8); close(s);} }
