# Plack::Test::Suite against `monodon serve --psgi`, the way Plack runs it
# against servers it cannot load (t/Plack-Handler/apache2.t): the server
# is a code reference that execs it. Run by tests/perl.rs, which sets
# MONODON to the binary under test.
use strict;
use warnings;
use FindBin;
use Test::More;
use Plack::Test::Suite;

my $monodon = $ENV{MONODON} or plan skip_all => 'MONODON (the binary under test) is not set';

Plack::Test::Suite->run_server_tests(sub {
    my ($port) = @_;
    exec $monodon, 'serve', '--psgi', "$FindBin::Bin/suite.psgi", '--listen', "127.0.0.1:$port",
        '--workers', 2
        or die "exec $monodon: $!";
});
done_testing;
