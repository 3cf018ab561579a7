# A PSGI app for what Plack::Test::Suite leaves out: bodies read in pieces
# (Content-Length and chunked, whole and streamed), per-worker state,
# psgix.harakiri and psgix.cleanup, slow requests and streamed responses.
# Wrapped in Plack's Lint, so a server breaking the PSGI spec gets a 500
# with the reason in the log.
use strict;
use warnings;
use JSON::PP ();
use Time::HiRes ();
use Plack::Middleware::Lint;

# Where this file was loaded: the template, or with --no-preload the worker.
my $loaded_in = $$;
my $json = JSON::PP->new->canonical;

sub reply {
    my ($doc, $status) = @_;
    my $body = $json->encode($doc) . "\n";
    return [ $status // 200, [ 'Content-Type' => 'application/json', 'Content-Length' => length $body ], [$body] ];
}

my %routes = (
    '/environ' => sub {
        my ($env) = @_;
        my %cgi = map { $_ => $env->{$_} } grep { !ref $env->{$_} } keys %$env;
        $env->{'psgi.errors'}->print("env seen for $env->{PATH_INFO}\n");
        return reply({ cgi => \%cgi, pid => $$, loaded_in => $loaded_in,
                       version => $env->{'psgi.version'}, buffered => $env->{'psgix.input.buffered'} ? 1 : 0 });
    },
    '/body' => sub {
        my ($env) = @_;
        my ($piece) = ($env->{QUERY_STRING} =~ /piece=(\d+)/);
        my $input = $env->{'psgi.input'};
        my ($data, $reads) = ('', 0);
        while (1) {
            my $n = $input->read(my $buf, $piece || 8192);
            die "read failed" unless defined $n;
            last if $n == 0;
            $data .= $buf;
            $reads++;
        }
        my $sum = 0;
        $sum += $_ for unpack 'C*', $data;
        return reply({ length => length $data, sum => $sum & 0xFFFFFFFF, reads => $reads,
                       buffered => $env->{'psgix.input.buffered'} ? 1 : 0 });
    },
    '/random' => sub {
        my ($env) = @_;
        my ($ms) = ($env->{QUERY_STRING} =~ /ms=(\d+)/);
        Time::HiRes::sleep(($ms // 0) / 1000);
        return reply({ pid => $$, random => rand });
    },
    '/sleep' => sub {
        my ($env) = @_;
        my ($ms) = ($env->{QUERY_STRING} =~ /ms=(\d+)/);
        Time::HiRes::sleep(($ms // 0) / 1000);
        return reply({ slept => $ms + 0 });
    },
    '/harakiri' => sub {
        my ($env) = @_;
        $env->{'psgix.harakiri.commit'} = 1 if $env->{'psgix.harakiri'};
        return reply({ pid => $$, harakiri => $env->{'psgix.harakiri'} ? 1 : 0 });
    },
    '/cleanup' => sub {
        my ($env) = @_;
        my ($file) = ($env->{QUERY_STRING} =~ /file=([\w\/.-]+)/);
        push @{ $env->{'psgix.cleanup.handlers'} }, sub {
            open my $fh, '>', $file or die "$file: $!";
            print $fh "cleaned up after the response\n";
        };
        return reply({ cleanup => $env->{'psgix.cleanup'} ? 1 : 0 });
    },
    '/stream' => sub {
        my ($env) = @_;
        return sub {
            my ($respond) = @_;
            my $writer = $respond->([ 200, [ 'Content-Type' => 'text/plain' ] ]);
            $writer->write("row $_\n") for 1 .. 100;
            $writer->close;
        };
    },
);

Plack::Middleware::Lint->wrap(sub {
    my ($env) = @_;
    my $route = $routes{ $env->{PATH_INFO} } or return reply({ error => 'no such route' }, 404);
    return $route->($env);
});
