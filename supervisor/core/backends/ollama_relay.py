"""The Ollama server's relay: its API on a UNIX socket that only localllm can reach.

Ollama listens on TCP only and has no API key, so on the host network any
local user could use its raw API (chat, pull, delete) and take its port first.
Instead its server runs in a network namespace of its own (a bridge network of
localllm's, so that pulls still reach the registry), listening on
127.0.0.1:11434 there, where nothing on the host can connect. A small relay in
the same container accepts connections on a UNIX socket in the server's
private socket directory (bind-mounted, as llama-server's is) and joins each to
that port.

The relay is Perl, which the images we run carry (``perl-base`` is essential on
Debian and Ubuntu, the bases of Ollama's images and of the stand-in). The
container's entrypoint becomes ``perl -e RELAY -- SOCKET PORT ENTRYPOINT...``: it
binds the socket, forks the relay, and executes the image's own entrypoint
(``/bin/ollama``) in its own place, so that Ollama is PID 1 and ``docker stop``
signals it. If the relay dies, the API goes quiet, liveness fails and the server
is replaced like any hung one.
"""

from __future__ import annotations

SOCKET_DIR = "/run/localllm"  # in the container: the socket's directory, mounted from <state_dir>/servers/<name>
SERVER_PORT = 11434  # inside the server's own network namespace
IMAGE_ENTRYPOINT = ("/bin/ollama",)  # Ollama's images' ENTRYPOINT (the stand-in mirrors it)

RELAY = r"""
use strict;
use warnings;
use IO::Select;
use IO::Socket::INET;
use IO::Socket::UNIX;
use Socket qw(SOCK_STREAM);

my ($path, $port, @server) = @ARGV;
unlink $path;
my $listener = IO::Socket::UNIX->new(Type => SOCK_STREAM, Local => $path, Listen => 128)
    or die "localllm relay: cannot listen on $path: $!\n";
chmod 0666, $path;  # the directories above it keep everyone but localllm out
my $relay = fork;
die "localllm relay: cannot fork: $!\n" unless defined $relay;
if ($relay) {
    close $listener;
    exec {$server[0]} @server or die "localllm relay: cannot run @server: $!\n";
}
$0 = "localllm-relay";
$SIG{CHLD} = "IGNORE";
while (1) {
    my $client = $listener->accept or next;
    my $pid = fork;
    if (!defined $pid || $pid) {
        close $client;
        next;
    }
    close $listener;
    relay($client);
    exit 0;
}

sub relay {
    my ($client) = @_;
    my $upstream = IO::Socket::INET->new(PeerAddr => "127.0.0.1", PeerPort => $port, Proto => "tcp") or return;
    my $select = IO::Select->new($client, $upstream);
    my $buffer;
    while (1) {
        for my $from ($select->can_read) {
            my $to = $from == $client ? $upstream : $client;
            my $read = sysread($from, $buffer, 65536);
            return unless $read;
            my $done = 0;
            while ($done < $read) {
                my $wrote = syswrite($to, $buffer, $read - $done, $done);
                return unless $wrote;
                $done += $wrote;
            }
        }
    }
}
"""


def entrypoint(socket_name: str) -> tuple[str, ...]:
    """The wrapped entrypoint: the relay on ``SOCKET_DIR/socket_name``, then the image's own."""
    return ("perl", "-e", RELAY, "--", f"{SOCKET_DIR}/{socket_name}", str(SERVER_PORT), *IMAGE_ENTRYPOINT)
