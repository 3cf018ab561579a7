# The smallest PSGI app: what the benchmarks serve.
my $body = "Hello, World!\n";
sub {
    [ 200, [ 'Content-Type' => 'text/plain', 'Content-Length' => length $body ], [$body] ];
};
