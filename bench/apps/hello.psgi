# The PSGI app Starlet, Starman, Monoceros and monodon --psgi serve in
# bench/run: `200 hello\n` to everything, with its Content-Length.
my $body = "hello\n";
sub { [ 200, [ 'Content-Type' => 'text/plain', 'Content-Length' => length $body ], [$body] ] };
