#!/usr/bin/perl
# monodon's PSGI worker: runs a PSGI 1.1 application under the monodon
# supervisor.
#
# `monodon serve --psgi app.psgi` starts this file; it is not meant to be
# run by hand. It speaks PROTOCOL.md's minimal profile: the supervisor
# parses and validates every request head and hands over one request at a
# time (FEATURE_PARSED); this worker runs the app, writes the response and
# hands the connection back. With templates (the default) one process per
# generation loads the app and forks the workers, so they share its memory
# and keep its code whatever changes on disk.
#
# Perl's core plus Socket::MsgHdr (recvmsg with SCM_RIGHTS, Debian's
# libsocket-msghdr-perl) and File::Map (the scoreboard, libfile-map-perl).
# Plack itself is not needed, but an app that uses it may.

use strict;
use warnings;
use 5.016;

use Config ();
use Errno qw(EAGAIN EINTR EWOULDBLOCK);
use Fcntl qw(SEEK_SET);
use File::Map ();
use File::Spec ();
use Getopt::Long ();
use IO::Handle ();
use POSIX ();
use overload ();
use Scalar::Util ();
use Socket ();
use Socket::MsgHdr ();
use Time::HiRes ();

package Monodon::PSGI;

# --- The protocol (PROTOCOL.md) --------------------------------------------

use constant {
    VERSION        => 1,
    READY          => 2,
    DONE           => 3,
    RETIRING       => 4,
    PARSED         => 7,
    TEMPLATE_READY => 16,
    FORK           => 17,
    FORKED         => 18,
    FORK_FAILED    => 19,
    FEATURE_PARSED => 2,
    CHANNEL_FD     => 3,
    SCOREBOARD_FD  => 4,
};

# Scoreboard offsets.
use constant {
    BYTES_WRITTEN    => 0,
    REQUESTS         => 8,
    STARTED_MS       => 16,
    DRAINING         => 24,
    REQUEST_SEQ      => 40,
    REQUEST_LEN      => 48,
    REQUEST_LINE     => 56,
    REQUEST_LINE_MAX => 256,
    CONN_ID          => 328,
    CONN_BASE        => 336,
    HOLD_LIMIT       => 344,
    RESPONSES        => 352,    # five words, 1xx to 5xx
    DURATIONS        => 392,    # seventeen words, one per bucket
    DURATION_SUM     => 528,
};
my @DURATION_BOUNDS_US = (
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000,
);

use constant {
    MSG_CMSG_CLOEXEC => 0x40000000,
    MSG_TRUNC        => 0x20,
    MSG_CTRUNC       => 0x08,
    PR_SET_PDEATHSIG => 1,
    MAX_DRAIN        => 1 << 20,
    BODY_RATE_GRACE  => 10,    # seconds before --min-body-rate applies
    SENDFILE_CHUNK   => 1 << 20,
    CONTROL_LEN      => 256,    # room for a few descriptors
    FLAG_KEEP_ALIVE  => 1,      # the Parsed request's flags
    FLAG_CONTINUE    => 2,
    FLAG_COMPLETE    => 4,
    FLAG_HTTPS       => 8,
};

# System calls Perl has no word for, by architecture.
my %SYSCALLS = (
    x86_64  => { prctl => 157, sendfile => 40, recvmsg => 47 },
    aarch64 => { prctl => 167, sendfile => 71, recvmsg => 212 },
);
my $SYSCALL = $SYSCALLS{ (split /-/, $Config::Config{archname})[0] } || {};

my %REASONS = (
    100 => 'Continue', 101 => 'Switching Protocols', 102 => 'Processing', 103 => 'Early Hints',
    200 => 'OK', 201 => 'Created', 202 => 'Accepted', 203 => 'Non-Authoritative Information',
    204 => 'No Content', 205 => 'Reset Content', 206 => 'Partial Content', 207 => 'Multi-Status',
    208 => 'Already Reported', 226 => 'IM Used',
    300 => 'Multiple Choices', 301 => 'Moved Permanently', 302 => 'Found', 303 => 'See Other',
    304 => 'Not Modified', 305 => 'Use Proxy', 307 => 'Temporary Redirect', 308 => 'Permanent Redirect',
    400 => 'Bad Request', 401 => 'Unauthorized', 402 => 'Payment Required', 403 => 'Forbidden',
    404 => 'Not Found', 405 => 'Method Not Allowed', 406 => 'Not Acceptable',
    407 => 'Proxy Authentication Required', 408 => 'Request Timeout', 409 => 'Conflict', 410 => 'Gone',
    411 => 'Length Required', 412 => 'Precondition Failed', 413 => 'Content Too Large',
    414 => 'URI Too Long', 415 => 'Unsupported Media Type', 416 => 'Range Not Satisfiable',
    417 => 'Expectation Failed', 418 => "I'm a teapot", 421 => 'Misdirected Request',
    422 => 'Unprocessable Content', 423 => 'Locked', 424 => 'Failed Dependency', 425 => 'Too Early',
    426 => 'Upgrade Required', 428 => 'Precondition Required', 429 => 'Too Many Requests',
    431 => 'Request Header Fields Too Large', 451 => 'Unavailable For Legal Reasons',
    500 => 'Internal Server Error', 501 => 'Not Implemented', 502 => 'Bad Gateway',
    503 => 'Service Unavailable', 504 => 'Gateway Timeout', 505 => 'HTTP Version Not Supported',
    506 => 'Variant Also Negotiates', 507 => 'Insufficient Storage', 508 => 'Loop Detected',
    510 => 'Not Extended', 511 => 'Network Authentication Required',
);

my %HOP_BY_HOP = map { $_ => 1 }
    qw(connection keep-alive transfer-encoding te trailer upgrade proxy-authenticate proxy-authorization);

sub logline {
    my ($message) = @_;
    print STDERR "monodon-psgi[$$]: $message\n";
}

# A protocol error ends the worker; a client error is answered.
sub protocol_error { die { protocol => $_[0] } }
sub client_error { die { status => $_[0], reason => $_[1] } }

# --- Settings ------------------------------------------------------------------

# What the supervisor tells a worker in its environment.
sub settings {
    my %s;
    my $number = sub {
        my ($name, $default) = @_;
        my $value = $ENV{$name};
        return $default unless defined $value;
        die "$name=$value is not valid (see PROTOCOL.md)\n" unless $value =~ /^\d+$/;
        return $value + 0;
    };
    $s{supervisor_pid} = $number->('MONODON_SUPERVISOR_PID', 0);
    $s{generation}     = $number->('MONODON_GENERATION', 0);
    $s{max_requests}   = $number->('MONODON_MAX_REQUESTS', 0);
    $s{min_body_rate}  = $number->('MONODON_MIN_BODY_RATE', 0);
    my $io_timeout = $number->('MONODON_IO_TIMEOUT', 30);
    $s{io_timeout} = $io_timeout < 1 ? 1 : $io_timeout;
    my $limits = $ENV{MONODON_LIMITS} // '4094,8190,100,65536,1073741824,65536';
    my @fields = split /,/, $limits;
    die "MONODON_LIMITS=$limits is not valid (see PROTOCOL.md)\n"
        if @fields < 6 || grep { !/^\d+$/ } @fields;
    @s{qw(max_head max_body buffered_body)} = @fields[ 3, 4, 5 ];
    $s{access_log}        = $ENV{MONODON_ACCESS_LOG} || undef;
    $s{access_log_format} = $ENV{MONODON_ACCESS_LOG_FORMAT} // 'combined';
    $s{max_message}       = 2 * $s{max_head} + $s{buffered_body} + 65536;
    return \%s;
}

sub die_with_supervisor {
    my ($supervisor_pid) = @_;
    syscall($SYSCALL->{prctl}, PR_SET_PDEATHSIG, 15, 0, 0, 0) if $SYSCALL->{prctl};
    POSIX::_exit(1) if $supervisor_pid && getppid() != $supervisor_pid;
}

sub monotonic { Time::HiRes::clock_gettime(Time::HiRes::CLOCK_MONOTONIC()) }

# --- The scoreboard ------------------------------------------------------------

# The worker's shared page: aligned 8-byte stores the supervisor reads.
# Only this process writes the fields it writes, so it keeps their values
# itself and never reads them back.
package Monodon::PSGI::Scoreboard {

    sub new {
        my ($class) = @_;
        open my $fh, '+<&=', Monodon::PSGI::SCOREBOARD_FD or die "the scoreboard (fd 4): $!\n";
        File::Map::map_handle(my $map, $fh, '+<', 0, 4096);
        return bless { map => \$map, fh => $fh, written => 0, requests => 0, seq => 0, counts => [ (0) x 23 ] },
            $class;
    }

    sub add_written {
        my ($self, $n) = @_;
        substr(${ $self->{map} }, Monodon::PSGI::BYTES_WRITTEN, 8) = pack 'Q', $self->{written} += $n;
    }

    # A request begins, at `now` (monotonic seconds): the connection's id
    # and its bytes so far (offset 336 before 328), the request line (the
    # sequence odd while it is written), and the start time.
    sub begin {
        my ($self, $conn_id, $line, $now) = @_;
        my $map = $self->{map};
        substr($$map, Monodon::PSGI::CONN_BASE, 8) = pack 'Q', $self->{written};
        substr($$map, Monodon::PSGI::CONN_ID, 8) = pack 'Q', $conn_id;
        my $length = length $line;
        $length = Monodon::PSGI::REQUEST_LINE_MAX if $length > Monodon::PSGI::REQUEST_LINE_MAX;
        substr($$map, Monodon::PSGI::REQUEST_SEQ, 8) = pack 'Q', ++$self->{seq};
        substr($$map, Monodon::PSGI::REQUEST_LEN, 8 + $length) = pack('Q', $length) . substr($line, 0, $length);
        substr($$map, Monodon::PSGI::REQUEST_SEQ, 8) = pack 'Q', ++$self->{seq};
        my $ms = int($now * 1000);
        substr($$map, Monodon::PSGI::STARTED_MS, 8) = pack 'Q', $ms > 0 ? $ms : 1;
    }

    # The request is answered: its status class and duration counted (the
    # words at 352-535 are only ours, so they go in one store), then the
    # start time back to 0 and the request count up.
    sub end_request {
        my ($self, $status, $took_us) = @_;
        my $counts = $self->{counts};    # 5 classes, 17 buckets, the sum
        $counts->[ int($status / 100) - 1 ]++ if $status >= 100 && $status <= 599;
        my $bucket = 0;
        $bucket++ while $bucket < @DURATION_BOUNDS_US && $took_us > $DURATION_BOUNDS_US[$bucket];
        $counts->[ 5 + $bucket ]++;
        $counts->[22] += $took_us;
        my $map = $self->{map};
        substr($$map, Monodon::PSGI::RESPONSES, 184) = pack 'Q23', @$counts;
        substr($$map, Monodon::PSGI::REQUESTS, 16) = pack 'QQ', ++$self->{requests}, 0;
    }

    sub draining   { substr(${ $_[0]{map} }, Monodon::PSGI::DRAINING, 8) ne "\0" x 8 }
    sub limit_held { substr(${ $_[0]{map} }, Monodon::PSGI::HOLD_LIMIT, 8) ne "\0" x 8 }
}

# --- Messages ------------------------------------------------------------------

# The channel to the supervisor (fd 3). Messages come with recvmsg(2):
# through the raw system call where this architecture's numbers are known,
# into buffers made once, since Socket::MsgHdr makes a fresh buffer of the
# largest message's size for every receive (a 256 KiB allocation and memset
# per request, 8 µs measured); through Socket::MsgHdr elsewhere.
package Monodon::PSGI::Channel {

    sub new {
        my ($class, $size) = @_;
        open my $fh, '+<&=', Monodon::PSGI::CHANNEL_FD or die "the channel (fd 3): $!\n";
        my $self = bless { fh => $fh, fd => Monodon::PSGI::CHANNEL_FD, size => $size }, $class;
        # MONODON_PSGI_MSGHDR=1 takes Socket::MsgHdr's way anywhere (the tests use it).
        $self->{raw} = $SYSCALL->{recvmsg} && !$ENV{MONODON_PSGI_MSGHDR};
        if ($self->{raw}) {
            $self->{buf}     = "\0" x $size;
            $self->{control} = "\0" x Monodon::PSGI::CONTROL_LEN;
            # struct iovec and struct msghdr (LP64): pointers into the two
            # buffers above, which are never assigned again.
            $self->{iov}    = pack 'P Q', $self->{buf}, $size;
            $self->{msghdr} = pack 'Q Q P Q P Q Q', 0, 0, $self->{iov}, 1, $self->{control},
                Monodon::PSGI::CONTROL_LEN, 0;
        } else {
            $self->{hdr} = Socket::MsgHdr->new;
        }
        return $self;
    }

    sub send {
        my ($self, $kind, $payload) = @_;
        my $msg = pack('CC', Monodon::PSGI::VERSION, $kind) . ($payload // '');
        my $sent = syswrite $self->{fh}, $msg;
        die "the channel: $!\n" unless defined $sent && $sent == length $msg;
    }

    # One message and its descriptors; () once the channel is closed.
    sub receive {
        my ($self, $max_fds) = @_;
        my ($n, $msg, $flags, @fds);
        if ($self->{raw}) {
            my $nr = $SYSCALL->{recvmsg};
            substr($self->{msghdr}, 40, 8) = pack 'Q', Monodon::PSGI::CONTROL_LEN;
            do { $n = syscall($nr, $self->{fd}, $self->{msghdr}, Monodon::PSGI::MSG_CMSG_CLOEXEC) }
                while $n < 0 && $!{EINTR};
            die "the channel: $!\n" if $n < 0;
            my $controllen;
            ($controllen, $flags) = unpack 'x40 Q L', $self->{msghdr};
            my $at = 0;
            while ($at + 16 <= $controllen) {
                my ($len, $level, $type) = unpack "x$at Q l l", $self->{control};
                last if $len < 16;
                push @fds, unpack 'i*', substr($self->{control}, $at + 16, $len - 16)
                    if $level == Socket::SOL_SOCKET() && $type == Socket::SCM_RIGHTS();
                $at += ($len + 7) & ~7;
            }
            $msg = substr $self->{buf}, 0, $n;
        } else {
            my $hdr = $self->{hdr};
            $hdr->buflen($self->{size});
            $hdr->controllen(Monodon::PSGI::CONTROL_LEN);
            do { $n = Socket::MsgHdr::recvmsg($self->{fh}, $hdr, Monodon::PSGI::MSG_CMSG_CLOEXEC) }
                while !defined $n && $!{EINTR};
            die "the channel: $!\n" unless defined $n;
            my @cmsg = $hdr->cmsghdr;
            while (my ($level, $type, $data) = splice @cmsg, 0, 3) {
                push @fds, unpack 'i*', $data if $level == Socket::SOL_SOCKET() && $type == Socket::SCM_RIGHTS();
            }
            ($msg, $flags) = ($hdr->buf, $hdr->flags);
        }
        if ($flags & (Monodon::PSGI::MSG_TRUNC | Monodon::PSGI::MSG_CTRUNC) || @fds > $max_fds) {
            POSIX::close($_) for @fds;
            Monodon::PSGI::protocol_error('message or its descriptors cut short');
        }
        return if $n == 0 && !@fds;
        return ($msg, @fds);
    }
}

# A Parsed request (PROTOCOL.md, Parsed requests) as a hash, by one unpack.
# Its flags are read where they are used (FLAG_*).
sub decode_request {
    my ($msg) = @_;
    protocol_error('expected a parsed request') unless substr($msg, 0, 2) eq pack('CC', VERSION, PARSED);
    my @fields = unpack 'x2 Q< V v/a v/a C C C Q< v/a V/a v/(v/a V/a) V/a .', $msg;
    my $end = pop @fields;
    protocol_error('a parsed request cut short') unless defined $end && @fields >= 11 && $end <= length $msg;
    my %r;
    @r{qw(conn_id served client local minor flags framing length method target)} = splice @fields, 0, 10;
    $r{body}            = pop @fields;
    $r{headers}         = \@fields;
    $r{rest}            = substr $msg, $end;
    return \%r;
}

# --- The client connection -----------------------------------------------------

# The connection, non-blocking (its flag is shared with the supervisor):
# reads and writes wait with select, up to the I/O timeout. Used through its
# descriptor alone (POSIX::read and ::write), so that a request costs no
# PerlIO handle and none of the system calls that opening one makes.
package Monodon::PSGI::Connection {

    sub new {
        my ($class, $fd, $timeout) = @_;
        return bless { fd => $fd, timeout => $timeout }, $class;
    }

    sub wait_for {
        my ($self, $write) = @_;
        my $bits = '';
        vec($bits, $self->{fd}, 1) = 1;
        my $n = $write ? select(undef, my $w = $bits, undef, $self->{timeout})
                       : select(my $r = $bits, undef, undef, $self->{timeout});
        return 1 if $n > 0 || ($n < 0 && $!{EINTR});
        Monodon::PSGI::client_error(408, $write ? 'the client does not read' : 'the request body did not arrive in time');
    }

    # Up to 64 KiB; '' once the client has closed.
    sub read_some {
        my ($self) = @_;
        while (1) {
            my $n = POSIX::read($self->{fd}, my $data, 65536);
            return $n ? $data : '' if defined $n;
            if ($!{EAGAIN} || $!{EWOULDBLOCK} || $!{EINTR}) { $self->wait_for(0); next }
            die { gone => "reading: $!" };
        }
    }

    sub write_all {
        my ($self, $data) = @_;
        my $fd = $self->{fd};
        while (1) {
            my $n = POSIX::write($fd, $data, length $data);
            if (defined $n) {
                return if $n == length $data;
                substr($data, 0, $n) = '';
                next;
            }
            if ($!{EAGAIN} || $!{EWOULDBLOCK} || $!{EINTR}) { $self->wait_for(1); next }
            die { gone => "writing: $!" };
        }
    }

    # sendfile(2) of `count` bytes from the file's current position; the
    # bytes sent, or undef where the system call is not known here.
    sub sendfile {
        my ($self, $file_fd, $count, $before_each) = @_;
        my $nr = $SYSCALL->{sendfile} or return undef;
        my $sent = 0;
        while ($sent < $count) {
            my $want = $count - $sent;
            $want = Monodon::PSGI::SENDFILE_CHUNK if $want > Monodon::PSGI::SENDFILE_CHUNK;
            $before_each->($want);
            my $n = syscall($nr, $self->{fd}, $file_fd, 0, $want);
            if ($n < 0) {
                $before_each->(-$want);
                if ($!{EAGAIN} || $!{EINTR}) { $self->wait_for(1); next }
                die { gone => "sendfile: $!" };
            }
            $before_each->($n - $want);
            last if $n == 0;    # the file is shorter than it was
            $sent += $n;
        }
        return $sent;
    }

    sub close { POSIX::close($_[0]{fd}) }
}

# --- psgi.input ----------------------------------------------------------------

# The request body still on the wire: what the supervisor read so far, then
# the connection; never past the body's end. Chunked bodies are decoded as
# strictly as the supervisor decodes them.
package Monodon::PSGI::Input {

    sub new {
        my ($class, $request, $conn, $settings) = @_;
        my $self = bless {
            conn      => $conn,
            decoded   => '',
            done      => 0,
            extra     => '',    # bytes read past the body: the next request's
            total     => 0,
            error     => undef,
            max_body  => $settings->{max_body},
            min_rate  => $settings->{min_body_rate},
            received  => 0,
            since     => undef,
            continue  => $request->{flags} & Monodon::PSGI::FLAG_CONTINUE,
        }, $class;
        if ($request->{framing} == 1) {
            $self->{mode}      = 'length';
            $self->{remaining} = $request->{length} - length $request->{body};
            $self->{decoded}   = $request->{body};
            $self->{done}      = $self->{remaining} <= 0;
        } else {
            $self->{mode}  = 'chunked';
            $self->{raw}   = $request->{body};
            $self->{state} = 'size';
            $self->{trailer_bytes} = 0;
        }
        return $self;
    }

    sub finished { $_[0]{done} }

    sub recv {
        my ($self) = @_;
        if ($self->{continue}) {
            $self->{continue} = 0;
            $self->{conn}->write_all("HTTP/1.1 100 Continue\r\n\r\n");
        }
        # A client trickling its body holds a worker: past a grace period it
        # must average --min-body-rate, as for the Rust workers.
        my $now = Monodon::PSGI::monotonic();
        $self->{since} //= $now;
        my $elapsed = $now - $self->{since};
        Monodon::PSGI::client_error(408, 'request body sent too slowly')
            if $self->{min_rate} && $elapsed > Monodon::PSGI::BODY_RATE_GRACE
            && $self->{received} < $self->{min_rate} * $elapsed;
        my $data = $self->{conn}->read_some;
        Monodon::PSGI::client_error(400, 'the client closed the connection inside the body') if $data eq '';
        $self->{received} += length $data;
        return $data;
    }

    # Decodes at least one more byte, or finds the end.
    sub fill {
        my ($self) = @_;
        my $ok = eval { $self->fill_once; 1 };
        return if $ok;
        my $e = $@;
        $self->{error} = $e if ref $e eq 'HASH' && $e->{status};
        die $e;
    }

    sub fill_once {
        my ($self) = @_;
        if ($self->{mode} eq 'length') {
            my $data = $self->recv;
            if (length $data > $self->{remaining}) {
                $self->{extra} = substr $data, $self->{remaining};
                substr($data, $self->{remaining}) = '';
            }
            $self->{remaining} -= length $data;
            $self->{decoded} .= $data;
            $self->{done} = $self->{remaining} == 0;
            return;
        }
        my $before = length $self->{decoded};
        while (!$self->{done} && length $self->{decoded} == $before) {
            $self->{raw} .= $self->recv unless $self->step;
        }
    }

    sub line {
        my ($self) = @_;
        my $end = index $self->{raw}, "\n";
        if ($end < 0) {
            Monodon::PSGI::client_error(400, 'chunk size line too long') if length $self->{raw} > 4096;
            return undef;
        }
        my $line = substr $self->{raw}, 0, $end + 1, '';
        Monodon::PSGI::client_error(400, 'bare CR or LF in a chunked body')
            unless $line =~ s/\r\n\z// && index($line, "\r") < 0;
        return $line;
    }

    # One step of the chunked decoder; false if it needs more bytes.
    sub step {
        my ($self) = @_;
        my $state = $self->{state};
        if ($state eq 'size') {
            my $line = $self->line // return 0;
            my ($size) = split /;/, $line, 2;
            Monodon::PSGI::client_error(400, 'bad chunk size')
                unless defined $size && $size =~ /\A[0-9a-fA-F]{1,16}\z/;
            $self->{chunk_left} = hex $size;
            Monodon::PSGI::client_error(413, 'request body too large')
                if $self->{total} + $self->{chunk_left} > $self->{max_body};
            $self->{state} = $self->{chunk_left} ? 'data' : 'trailers';
            return 1;
        }
        if ($state eq 'data') {
            return 0 unless length $self->{raw};
            my $n = length $self->{raw};
            $n = $self->{chunk_left} if $n > $self->{chunk_left};
            $self->{decoded} .= substr $self->{raw}, 0, $n, '';
            $self->{chunk_left} -= $n;
            $self->{total} += $n;
            $self->{state} = 'crlf' if $self->{chunk_left} == 0;
            return 1;
        }
        if ($state eq 'crlf') {
            return 0 if length $self->{raw} < 2;
            Monodon::PSGI::client_error(400, 'chunk data not followed by CRLF')
                unless substr($self->{raw}, 0, 2, '') eq "\r\n";
            $self->{state} = 'size';
            return 1;
        }
        # Trailer fields, up to the blank line; dropped, as the supervisor does.
        my $line = $self->line // return 0;
        $self->{trailer_bytes} += length($line) + 2;
        Monodon::PSGI::client_error(431, 'trailers too large') if $self->{trailer_bytes} > 65536;
        if ($line eq '') {
            $self->{done}  = 1;
            $self->{extra} = $self->{raw};
            $self->{raw}   = '';
        }
        return 1;
    }

    # PSGI's read($buf, $len[, $offset]): like Perl's read.
    sub read {
        my ($self, undef, $len, $offset) = @_;
        $self->fill while length $self->{decoded} < $len && !$self->{done};
        my $data = substr $self->{decoded}, 0, $len, '';
        $_[1] = '' unless defined $_[1];
        $offset //= 0;
        $offset += length $_[1] if $offset < 0;
        $_[1] .= "\0" x ($offset - length $_[1]) if $offset > length $_[1];
        substr($_[1], $offset) = $data;
        return length $data;
    }

    # Not seekable (psgix.input.buffered is false): Plack buffers it when asked.
    sub seek { 0 }

    sub close { 1 }

    # Reads what is left of the body, up to `most` bytes: whether the body
    # ended (so the connection can carry another request).
    sub drain {
        my ($self, $most) = @_;
        # An unread body behind Expect: 100-continue is never asked for.
        return 0 if $self->{continue};
        my $left = $most;
        while (!$self->{done} && $left > 0) {
            $self->fill;
            $left -= length $self->{decoded};
            $self->{decoded} = '';
        }
        return $self->{done};
    }
}

# A body that came whole with the request: a seekable in-memory handle.
sub complete_body {
    my ($body) = @_;
    open my $fh, '<', \$body or die "an in-memory body: $!\n";
    return $fh;
}

# --- One exchange --------------------------------------------------------------

my @date = (0, '');

# The Date header's value, made once a second.
sub http_date {
    my $now = time;
    @date = ($now, POSIX::strftime('%a, %d %b %Y %H:%M:%S GMT', gmtime $now)) if $date[0] != $now;
    return $date[1];
}

# `ip:port` / `[v6]:port` / `unix` as (address, port).
sub split_address {
    my ($address) = @_;
    my $colon = rindex $address, ':';
    return ('', '') if $colon < 0;
    my ($host, $port) = (substr($address, 0, $colon), substr($address, $colon + 1));
    $host = substr($host, 1, -1) if substr($host, 0, 1) eq '[';
    return ($host, $port);
}

sub percent_decode {
    my ($s) = @_;
    $s =~ s/%([0-9A-Fa-f]{2})/chr hex $1/eg;
    return $s;
}

# One request on one connection: the env, the app, the response.
package Monodon::PSGI::Exchange {

    sub new {
        my ($class, $worker, $request, $conn) = @_;
        # Also, as the response goes: head_sent, pending (the head, waiting
        # for the first body bytes), chunked, length_left, bodiless, keep,
        # finished; each false until set.
        return bless {
            worker     => $worker,
            request    => $request,
            conn       => $conn,
            status     => 0,
            sent_bytes => 0,
            head_only  => $request->{method} eq 'HEAD',
        }, $class;
    }

    # The env, as Plack's servers build it (PSGI 1.1).
    sub env {
        my ($self, $input, $buffered) = @_;
        my $r = $self->{request};
        my $worker = $self->{worker};
        my $target = $r->{target};
        my $q = index $target, '?';
        my ($path, $query) = $q < 0 ? ($target, '') : (substr($target, 0, $q), substr($target, $q + 1));
        if (substr($path, 0, 1) ne '/' && $path =~ m{\A[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*(/.*)?\z}s) {
            $path = $1 // '/';    # absolute-form: the path is what follows the authority
        }
        my ($remote_addr, $remote_port) = Monodon::PSGI::split_address($r->{client});
        # A listener's own address is the same on every request it brings.
        my $server = $worker->{server_of}{ $r->{local} } //= [ Monodon::PSGI::split_address($r->{local}) ];
        my ($server_name, $server_port) = @$server;
        my $headers = $r->{headers};
        if ($r->{local} eq 'unix') {
            # A unix socket has no address of its own: the Host field names
            # the server, as the client saw it.
            my ($host) = map { $headers->[ 2 * $_ + 1 ] } grep { lc $headers->[ 2 * $_ ] eq 'host' } 0 .. @$headers / 2 - 1;
            ($server_name, $server_port) = ($host // '') =~ /\A\[?(.*?)\]?(?::(\d+))?\z/;
            $server_name = 'localhost' unless length($server_name // '');
            $server_port //= $r->{flags} & Monodon::PSGI::FLAG_HTTPS ? 443 : 80;
        }
        my %env = (
            REQUEST_METHOD         => $r->{method},
            SCRIPT_NAME            => '',
            PATH_INFO              => index($path, '%') >= 0 ? Monodon::PSGI::percent_decode($path) : $path,
            QUERY_STRING           => $query,
            REQUEST_URI            => $target,
            SERVER_NAME            => $server_name,
            SERVER_PORT            => $server_port,
            SERVER_PROTOCOL        => $r->{minor} ? 'HTTP/1.1' : 'HTTP/1.0',
            REMOTE_ADDR            => $remote_addr,
            REMOTE_PORT            => $remote_port,
            'psgi.version'         => [ 1, 1 ],
            'psgi.url_scheme'      => $r->{flags} & Monodon::PSGI::FLAG_HTTPS ? 'https' : 'http',
            'psgi.input'           => $input,
            'psgi.errors'          => *STDERR,
            'psgi.multithread'     => '',
            'psgi.multiprocess'    => 1,
            'psgi.run_once'        => '',
            'psgi.nonblocking'     => '',
            'psgi.streaming'       => 1,
            'psgix.input.buffered' => $buffered,
            'psgix.harakiri'       => 1,
            'psgix.cleanup'        => 1,
            'psgix.cleanup.handlers' => [],
            'monodon.generation'   => $worker->{settings}{generation},
        );
        my @underscored;
        for (my $i = 0; $i < @$headers; $i += 2) {
            my $name = $headers->[$i];
            if (index($name, '_') >= 0) {
                push @underscored, $i;
                next;
            }
            (my $key = uc $name) =~ tr/-/_/;
            $key = "HTTP_$key" unless $key eq 'CONTENT_TYPE' || $key eq 'CONTENT_LENGTH';
            if (!exists $env{$key}) {
                $env{$key} = $headers->[ $i + 1 ];
            } elsif (substr($key, 0, 5) eq 'HTTP_') {
                $env{$key} .= ($key eq 'HTTP_COOKIE' ? '; ' : ', ') . $headers->[ $i + 1 ];
            } else {
                $env{$key} = $headers->[ $i + 1 ];
            }
        }
        return \%env unless @underscored;
        my $policy = $worker->{underscore_headers};
        Monodon::PSGI::client_error(400, "header name with an underscore: $headers->[$underscored[0]]")
            if $policy eq 'refuse';
        return \%env unless $policy eq 'allow';
        my %from_underscore;
        for my $i (@underscored) {
            (my $key = uc $headers->[$i]) =~ tr/-/_/;
            $key = "HTTP_$key" unless $key eq 'CONTENT_TYPE' || $key eq 'CONTENT_LENGTH';
            next if exists $env{$key} && !$from_underscore{$key};    # an underscore name never replaces a dash name
            if ($from_underscore{$key} && substr($key, 0, 5) eq 'HTTP_') {
                $env{$key} .= ', ' . $headers->[ $i + 1 ];
            } else {
                $env{$key} = $headers->[ $i + 1 ];
            }
            $from_underscore{$key} = 1;
        }
        return \%env;
    }

    # The head for `status` and `headers`, kept until the first body bytes
    # so that a small response is one write.
    sub start {
        my ($self, $status, $headers, $known_length) = @_;
        die "the response's status must be a number, not " . ($status // 'undef') . "\n"
            unless defined $status && $status =~ /\A[1-5]\d\d\z/;
        my $r = $self->{request};
        $self->{status} = $status;
        my $keep = $r->{flags} & Monodon::PSGI::FLAG_KEEP_ALIVE && !$self->{worker}{board}->draining;
        my $bodiless = $status < 200 || $status == 204 || $status == 304;
        my $reason = $REASONS{$status} // 'Unknown';
        my $head = "HTTP/1.$r->{minor} $status $reason\r\n";
        my ($has_length, $has_date);
        for (my $i = 0; $i < @$headers; $i += 2) {
            my ($name, $value) = ($headers->[$i], $headers->[ $i + 1 ]);
            my $lower = lc $name;
            if ($HOP_BY_HOP{$lower}) {
                $keep = 0 if $lower eq 'connection' && $value =~ /close/i;
                next;
            }
            if ($lower eq 'content-length') {
                next if $bodiless;
                if ($value =~ /\A\d+\z/) { $has_length = 1; $self->{length_left} = $value } else { $keep = 0 }
            }
            $has_date = 1 if $lower eq 'date';
            $head .= "$name: $value\r\n";
        }
        $head .= 'Date: ' . Monodon::PSGI::http_date() . "\r\n" unless $has_date;
        $self->{bodiless} = $bodiless;
        if ($bodiless || $has_length) {
        } elsif (defined $known_length) {
            $self->{length_left} = $known_length;
            $head .= "Content-Length: $known_length\r\n";
        } elsif ($self->{head_only}) {
        } elsif ($r->{minor} >= 1) {
            $self->{chunked} = 1;
            $head .= "Transfer-Encoding: chunked\r\n";
        } else {
            $keep = 0;
        }
        if (!$keep) {
            $head .= "Connection: close\r\n";
        } elsif ($r->{minor} == 0) {
            $head .= "Connection: keep-alive\r\n";
        }
        $self->{keep}      = $keep;
        $self->{head_sent} = 1;
        $self->{pending}   = "$head\r\n";
    }

    sub send {
        my ($self, $data) = @_;
        if (defined $self->{pending}) {
            $data = $self->{pending} . $data;
            $self->{pending} = undef;
        }
        # Counted before it goes out: a worker that dies mid-write must not
        # have the supervisor answer 502 after part of a response.
        $self->{worker}{board}->add_written(length $data);
        $self->{conn}->write_all($data);
    }

    sub flush { $_[0]->send('') if defined $_[0]{pending} }

    # No byte of the response has gone out: another can be sent.
    sub nothing_sent { !$_[0]{head_sent} || defined $_[0]{pending} }

    sub write {
        my ($self, $data) = @_;
        return unless defined $data;
        $data = "$data" if ref $data;
        utf8::downgrade($data, 1)
            or die "the response body has a character above 255: encode it (PSGI bodies are bytes)\n";
        if ($data eq '' || $self->{head_only} || $self->{bodiless}) {
            $self->flush;
            return;
        }
        if (defined $self->{length_left}) {
            $data = substr $data, 0, $self->{length_left} if length $data > $self->{length_left};
            $self->{length_left} -= length $data;
        }
        $self->{sent_bytes} += length $data;
        $self->send($self->{chunked} ? sprintf('%x', length $data) . "\r\n$data\r\n" : $data);
    }

    sub finish {
        my ($self) = @_;
        return if $self->{finished};
        $self->{finished} = 1;
        $self->send("0\r\n\r\n") if $self->{chunked} && !$self->{head_only};
        $self->flush;
        $self->{keep} = 0 if $self->{length_left};    # the app sent less than it said
    }

    # A body: an array of strings, or a handle (or object) with getline.
    sub body {
        my ($self, $body) = @_;
        if (ref $body eq 'ARRAY') {
            $self->write($_) for @$body;
            return;
        }
        if (!$self->sendfile($body)) {
            local $/ = \65536;
            while (defined(my $line = $body->getline)) {
                $self->write($line);
            }
        }
    }

    # A real file goes out with sendfile(2), from its current position.
    sub sendfile {
        my ($self, $body) = @_;
        return 0 if $self->{chunked} || $self->{bodiless} || $self->{head_only};
        my $fd = Scalar::Util::reftype($body) eq 'GLOB' ? fileno($body) : undef;
        return 0 unless defined $fd && $fd >= 0 && -f $body;
        my $at = tell $body;
        return 0 if $at < 0;
        my $size = (-s $body) - $at;
        $size = $self->{length_left} if defined $self->{length_left} && $self->{length_left} < $size;
        return 0 unless sysseek $body, $at, Fcntl::SEEK_SET;
        $self->flush;
        my $board = $self->{worker}{board};
        my $sent = $self->{conn}->sendfile($fd, $size, sub { $board->add_written($_[0]) });
        return 0 unless defined $sent;
        $self->{sent_bytes} += $sent;
        $self->{length_left} -= $sent if defined $self->{length_left};
        return 1;
    }

    # The length of a file body from its position, if it is one.
    sub known_length {
        my ($body) = @_;
        return undef unless Scalar::Util::reftype($body) eq 'GLOB';
        my $fd = fileno $body;
        return undef unless defined $fd && $fd >= 0 && -f $body;
        my $at = tell $body;
        return $at < 0 ? undef : (-s $body) - $at;
    }

    # A full response, [status, headers, body].
    sub respond {
        my ($self, $res) = @_;
        die "the response must be an array [status, headers, body]\n" unless ref $res eq 'ARRAY' && @$res == 3;
        my ($status, $headers, $body) = @$res;
        if (ref $body eq 'ARRAY') {
            # Joined once: its length is known, and the head goes out with it.
            my $data = join '', @$body;
            utf8::downgrade($data, 1)
                or die "the response body has a character above 255: encode it (PSGI bodies are bytes)\n";
            $self->start($status, $headers, length $data);
            if ($self->{head_only} || $self->{bodiless}) {
                $data = '';
            } elsif (defined(my $left = $self->{length_left})) {
                # The app's own Content-Length counts: more is cut, less ends the connection.
                substr($data, $left) = '' if length $data > $left;
                $self->{keep} = 0 if length $data < $left;
            }
            $self->{sent_bytes} = length $data;
            $self->{finished}   = 1;
            $self->send($data);    # after the head, in one write
            return;
        }
        $self->start($status, $headers, known_length($body));
        my $ok = eval { $self->body($body); 1 };
        my $error = $@;
        if (!Scalar::Util::blessed($body) || $body->can('close')) {
            eval { $body->close; 1 } or Monodon::PSGI::logline("the body's close failed: $@");
        }
        die $error unless $ok;
        $self->finish;
    }

    # The responder of a delayed response: a full response, or the writer
    # of a streamed one.
    sub responder {
        my ($self) = @_;
        return sub {
            my ($res) = @_;
            die "the responder was called twice\n" if $self->{head_sent};
            if (ref $res eq 'ARRAY' && @$res == 2) {
                $self->start($res->[0], $res->[1]);
                return bless { exchange => $self }, 'Monodon::PSGI::Writer';
            }
            $self->respond($res);
            return;
        };
    }
}

# The writer of a streamed response (psgi.streaming).
package Monodon::PSGI::Writer {
    sub write   { $_[0]{exchange}->write($_[1]); 1 }
    sub close   { $_[0]{exchange}->finish }
    sub poll_cb { $_[1]->($_[0]) }
}

# A response before the app saw the request, or in place of a failed one.
sub refuse {
    my ($conn, $board, $status, $reason) = @_;
    my $body = "$status " . ($REASONS{$status} // '') . ": $reason\n";
    my $data = "HTTP/1.1 $status " . ($REASONS{$status} // 'Error') . "\r\nContent-Type: text/plain\r\n"
        . 'Content-Length: ' . length($body) . "\r\nConnection: close\r\n\r\n$body";
    $board->add_written(length $data);
    eval { $conn->write_all($data) };
    return length $data;
}

# --- The access log ------------------------------------------------------------

# The same lines the Rust workers write (proto/src/access_log.rs).
package Monodon::PSGI::AccessLog {

    sub new {
        my ($class, $path, $format) = @_;
        my $self = bless { path => $path, format => $format }, $class;
        $self->reopen;
        return $self;
    }

    sub reopen {
        my ($self) = @_;
        if ($self->{path} eq '-') {
            $self->{fh} = \*STDOUT;
        } else {
            open my $fh, '>>', $self->{path} or die "the access log $self->{path}: $!\n";
            $self->{fh} = $fh;
        }
        $self->{fh}->autoflush(1);
    }

    sub quote {
        my ($s) = @_;
        return '-' unless defined $s;
        $s =~ s/(["\\])/\\$1/g;
        $s =~ s/([\x00-\x1f\x7f])/sprintf '\\x%02x', ord $1/eg;
        return $s;
    }

    sub json_string {
        my ($s) = @_;
        return 'null' unless defined $s;
        $s =~ s/(["\\])/\\$1/g;
        $s =~ s/([\x00-\x1f\x7f])/sprintf '\\u%04x', ord $1/eg;
        return qq("$s");
    }

    sub write {
        my ($self, $r, $status, $size, $took_us, $generation) = @_;
        my %h;
        my @headers = @{ $r->{headers} };
        while (my ($name, $value) = splice @headers, 0, 2) { $h{ lc $name } //= $value }
        my $version = "HTTP/1.$r->{minor}";
        my $line;
        if ($self->{format} eq 'json') {
            $line = sprintf '{"time":%s,"peer":%s,"method":%s,"target":%s,"version":"%s","status":%d,'
                . '"bytes":%d,"referer":%s,"user_agent":%s,"duration_us":%d,"pid":%d,"generation":%d}',
                json_string(Monodon::PSGI::http_date()), json_string($r->{client}), json_string($r->{method}),
                json_string($r->{target}), $version, $status, $size, json_string($h{referer}),
                json_string($h{'user-agent'}), $took_us, $$, $generation;
        } else {
            my $host = $r->{client} =~ /\A\[?(.*?)\]?:\d+\z/ ? $1 : $r->{client};
            my $stamp = POSIX::strftime('%d/%b/%Y:%H:%M:%S +0000', gmtime);
            $line = sprintf '%s - - [%s] "%s %s %s" %d %d "%s" "%s" %d', $host, $stamp, quote($r->{method}),
                quote($r->{target}), $version, $status, $size, quote($h{referer}), quote($h{'user-agent'}),
                $took_us;
        }
        print { $self->{fh} } "$line\n";
    }
}

# --- The worker ----------------------------------------------------------------

package Monodon::PSGI::Worker {

    sub new {
        my ($class, $app, $settings, $options) = @_;
        my $self = bless {
            app                => $app,
            settings           => $settings,
            underscore_headers => $options->{underscore_headers},
            board              => Monodon::PSGI::Scoreboard->new,
            channel            => Monodon::PSGI::Channel->new($settings->{max_message}),
            remaining          => $settings->{max_requests} > 0 ? $settings->{max_requests} : undef,
        }, $class;
        if ($settings->{access_log}) {
            my $log = $self->{access_log} =
                Monodon::PSGI::AccessLog->new($settings->{access_log}, $settings->{access_log_format});
            $SIG{USR1} = sub { $log->reopen };
        }
        return $self;
    }

    sub run {
        my ($self) = @_;
        $self->{channel}->send(Monodon::PSGI::READY,
            pack('VC', $$, Monodon::PSGI::FEATURE_PARSED));
        while (1) {
            my ($msg, @fds) = $self->{channel}->receive(1);
            return 0 unless defined $msg;
            Monodon::PSGI::protocol_error('a request without its connection') unless @fds == 1;
            return 0 if $self->serve(Monodon::PSGI::decode_request($msg), $fds[0]);
        }
    }

    # Serves one request; whether the worker leaves after it.
    sub serve {
        my ($self, $r, $fd) = @_;
        my $board = $self->{board};
        my $last = defined $self->{remaining} && $self->{remaining} <= 1 && !$board->limit_held;
        $self->{channel}->send(Monodon::PSGI::RETIRING) if $last;
        my $conn = Monodon::PSGI::Connection->new($fd, $self->{settings}{io_timeout});
        my $started = Monodon::PSGI::monotonic();
        $board->begin($r->{conn_id}, "$r->{method} $r->{target}", $started);
        my $exchange = Monodon::PSGI::Exchange->new($self, $r, $conn);
        my ($keep, $leftover, $env) = $self->exchange($exchange, $r, $conn);
        my $took_us = int((Monodon::PSGI::monotonic() - $started) * 1e6);
        $board->end_request($exchange->{status}, $took_us);
        $self->{access_log}->write($r, $exchange->{status}, $exchange->{sent_bytes}, $took_us,
            $self->{settings}{generation}) if $self->{access_log};
        $self->{remaining}-- if defined $self->{remaining};
        # Our copy goes before the Done: a close is final once the
        # supervisor closes its own.
        $conn->close;
        my $retire = $env && $env->{'psgix.harakiri.commit'};
        $self->{channel}->send(Monodon::PSGI::RETIRING) if $retire && !$last;
        $self->{channel}->send(Monodon::PSGI::DONE,
            pack('Q< V C', $r->{conn_id}, $r->{served} + 1, $keep ? 1 : 0) . ($keep ? $leftover : ''));
        if ($env) {
            for my $handler (@{ $env->{'psgix.cleanup.handlers'} || [] }) {
                eval { $handler->($env); 1 } or Monodon::PSGI::logline("a psgix.cleanup handler failed: $@");
            }
        }
        return $last || $retire;
    }

    # Runs the app; (keep the connection?, bytes past the request, the env).
    sub exchange {
        my ($self, $exchange, $r, $conn) = @_;
        my $board = $self->{board};
        # A body the supervisor had whole is read from memory; only one still
        # on the wire needs our reader.
        my $input = $r->{flags} & Monodon::PSGI::FLAG_COMPLETE ? undef : Monodon::PSGI::Input->new($r, $conn, $self->{settings});
        my $env;
        my $ok = eval {
            $env = $exchange->env($input // Monodon::PSGI::complete_body($r->{body}), $input ? '' : 1);
            my $res = $self->{app}->($env);
            if (ref $res eq 'CODE') {
                $res->($exchange->responder);
                die "the app's delayed response returned without responding (no event loop here)\n"
                    unless $exchange->{head_sent};
            } else {
                $exchange->respond($res);
            }
            die "a streamed response was not closed\n" unless $exchange->{finished} || !$exchange->{head_sent};
            1;
        };
        if (!$ok) {
            my $e = $@;
            if (ref $e eq 'HASH' && $e->{status}) {
                return (0, '', $env) unless $exchange->nothing_sent;
                $exchange->{status}     = $e->{status};
                $exchange->{sent_bytes} = Monodon::PSGI::refuse($conn, $board, $e->{status}, $e->{reason});
                return (0, '', $env);
            }
            die $e if ref $e eq 'HASH' && $e->{protocol};
            if (ref $e eq 'HASH' && $e->{gone}) {
                # The client went away: nothing to tell, except a stall.
                return (0, '', $env);
            }
            Monodon::PSGI::logline("the app failed on $r->{method} $r->{target}: $e");
            if ($exchange->nothing_sent) {
                $exchange->{status}     = 500;
                $exchange->{sent_bytes} = Monodon::PSGI::refuse($conn, $board, 500, 'the app failed; see the log');
            }
            return (0, '', $env);
        }
        my $keep = $exchange->{keep};
        if ($keep && $input && !$input->finished) {
            $keep = eval { $input->drain(Monodon::PSGI::MAX_DRAIN) } || 0;
        }
        $keep = 0 if $input && $input->{error};
        return ($keep, $r->{rest} . ($input ? $input->{extra} : ''), $env);
    }
}

# --- Loading the app, and the template -----------------------------------------

# The app of a .psgi file, as plackup loads it: the file's last value, a
# code reference (or an object that makes one).
sub load_app {
    my ($file) = @_;
    my $path = File::Spec->rel2abs($file);
    local $0 = $path;
    my $app = do {
        package main;
        local ($@, $!);
        my $value = do $path;
        die "loading $file: $@" if $@;
        die "loading $file: $!\n" unless defined $value || !$!;
        $value;
    };
    $app = $app->to_app if Scalar::Util::blessed($app) && $app->can('to_app');
    die "$file returned " . (defined $app ? "'$app'" : 'nothing') . ", not a PSGI app (a code reference)\n"
        unless ref $app eq 'CODE' || (Scalar::Util::blessed($app) && overload::Method($app, '&{}'));
    return $app;
}

# The template role (PROTOCOL.md, Templates): the app loaded once, then a
# worker forked for each Fork, twice so that the supervisor (a child
# subreaper) is its parent.
sub template {
    my ($options, $settings) = @_;
    my $app = $options->{no_preload} ? undef : load_app($options->{app});
    my $channel = Monodon::PSGI::Channel->new(65536);
    $channel->send(TEMPLATE_READY, pack('V', $$));
    while (1) {
        my ($msg, @fds) = $channel->receive(2);
        return 0 unless defined $msg;
        protocol_error('expected Fork with two descriptors')
            unless @fds == 2 && substr($msg, 0, 2) eq pack('CC', VERSION, FORK);
        my ($count, $at) = unpack 'x2 v .', $msg;
        my %variables = unpack "x$at (v/a V/a)$count", $msg;
        if ($INC{'threads.pm'} && threads->can('list') && threads->list) {
            $channel->send(FORK_FAILED, 'the app started threads in the template; a fork copies only one');
        } elsif (my $pid = fork_worker(\@fds, \%variables, $app, $options, $settings)) {
            $channel->send(FORKED, pack('V', $pid));
        } else {
            $channel->send(FORK_FAILED, "fork failed: $!");
        }
        POSIX::close($_) for @fds;
    }
}

# Forks a worker through a middle process; its pid, or 0.
sub fork_worker {
    my ($fds, $variables, $app, $options, $settings) = @_;
    pipe my $read_end, my $write_end or return 0;
    my $middle = fork;
    return 0 unless defined $middle;
    if ($middle == 0) {
        close $read_end;
        my $worker = fork;
        if (defined $worker && $worker == 0) {
            close $write_end;
            my $code = eval { become_worker($fds, $variables, $app, $options, $settings) };
            if (!defined $code) {
                logline(describe_error($@));
                $code = 1;
            }
            STDOUT->flush;
            STDERR->flush;
            POSIX::_exit($code);
        }
        syswrite $write_end, pack('V', $worker // 0);
        POSIX::_exit(0);
    }
    close $write_end;
    my $got = sysread $read_end, my $data, 4;
    close $read_end;
    waitpid $middle, 0;
    return $got && $got == 4 ? unpack('V', $data) : 0;
}

# In the forked worker: wait for the supervisor to adopt us, take the
# Fork's descriptors and variables, and serve.
sub become_worker {
    my ($fds, $variables, $app, $options, $settings) = @_;
    my $deadline = monotonic() + 5;
    while (getppid() != $settings->{supervisor_pid}) {
        return 1 if monotonic() > $deadline;
        Time::HiRes::sleep(0.0002);
    }
    POSIX::dup2($fds->[0], CHANNEL_FD) // die "dup2: $!\n";
    POSIX::dup2($fds->[1], SCOREBOARD_FD) // die "dup2: $!\n";
    POSIX::close($_) for grep { $_ != CHANNEL_FD && $_ != SCOREBOARD_FD } @$fds;
    @ENV{ keys %$variables } = values %$variables;
    delete $ENV{MONODON_ROLE};
    return serve_as_worker($app // load_app($options->{app}), $options, settings());
}

sub serve_as_worker {
    my ($app, $options, $settings) = @_;
    die_with_supervisor($settings->{supervisor_pid});
    srand;
    return Monodon::PSGI::Worker->new($app, $settings, $options)->run;
}

sub describe_error {
    my ($e) = @_;
    return "protocol error: $e->{protocol}" if ref $e eq 'HASH' && $e->{protocol};
    return "$e";
}

sub main {
    my %options = (underscore_headers => 'drop');
    Getopt::Long::GetOptions(
        'app=s'                => \$options{app},
        'no-preload'           => \$options{no_preload},
        'underscore-headers=s' => \$options{underscore_headers},
    ) or die "usage: monodon_psgi.pl --app FILE [--no-preload] [--underscore-headers drop|refuse|allow]\n";
    die "--app FILE is required\n" unless defined $options{app};
    die "started by `monodon serve --psgi`, not by hand\n" unless defined $ENV{MONODON_CHANNEL_FD};
    die "--underscore-headers $options{underscore_headers}: use drop, refuse or allow\n"
        unless $options{underscore_headers} =~ /\A(?:drop|refuse|allow)\z/;
    STDERR->autoflush(1);
    my $settings = settings();
    return template(\%options, $settings) if ($ENV{MONODON_ROLE} // '') eq 'template';
    die_with_supervisor($settings->{supervisor_pid});
    return serve_as_worker(load_app($options{app}), \%options, $settings);
}

package main;

# Run as a program; `require`d (by a benchmark of its parts), it only defines them.
unless (caller) {
    my $code = eval { Monodon::PSGI::main() };
    if (!defined $code) {
        Monodon::PSGI::logline(Monodon::PSGI::describe_error($@));
        exit 1;
    }
    exit $code;
}
1;
