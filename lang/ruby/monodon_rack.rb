# frozen_string_literal: true

# monodon's Rack worker: runs a Rack application (a config.ru) under the
# monodon supervisor.
#
# `monodon serve --rack config.ru` starts this file; it is not meant to be
# run by hand. It speaks PROTOCOL.md's minimal profile: the supervisor
# parses and validates every request head and hands over one request at a
# time (FEATURE_PARSED), and this worker runs the app, writes the response
# and hands the connection back. With templates (the default) one process
# per generation loads config.ru and forks the workers, so they share its
# memory and keep its code whatever changes on disk.
#
# Standard library only (Socket, Fiddle for the shared scoreboard page and
# a few system calls); Ruby 3.1 or later, 64-bit Linux. Rack's own builder
# is used when the rack library is installed, a small one of ours if not.

require "socket"
require "fiddle"
require "stringio"
require "tempfile"
require "io/wait"
require "optparse"

module Monodon
  # --- The protocol (PROTOCOL.md) -----------------------------------------

  PROTOCOL_VERSION = 1
  READY = 2
  DONE = 3
  RETIRING = 4
  PARSED = 7
  TEMPLATE_READY = 16
  FORK = 17
  FORKED = 18
  FORK_FAILED = 19
  FEATURE_PARSED = 2

  CHANNEL_FD = 3
  SCOREBOARD_FD = 4

  # Scoreboard byte offsets.
  BYTES_WRITTEN = 0
  REQUESTS = 8
  STARTED_MS = 16
  DRAINING = 24
  REQUEST_SEQ = 40
  REQUEST_LEN = 48
  REQUEST_LINE = 56
  REQUEST_LINE_MAX = 256
  CONN_ID = 328
  CONN_BASE = 336
  HOLD_LIMIT = 344
  RESPONSES = 352 # five words, 1xx to 5xx
  DURATIONS = 392 # seventeen words, one per bucket
  DURATION_SUM = 528
  DURATION_BOUNDS_US = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000,
    250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000
  ].freeze

  # Request flags and framings (PROTOCOL.md, Parsed requests).
  KEEP_ALIVE = 1
  EXPECT_CONTINUE = 2
  BODY_COMPLETE = 4
  HTTPS = 8
  FRAMING_LENGTH = 1

  MAX_DRAIN = 1 << 20 # unread body bytes skipped to keep a connection
  BODY_RATE_GRACE = 10 # seconds before --min-body-rate applies
  SPOOL_IN_MEMORY = 1 << 20 # a streamed body past this goes to a temp file
  SMALL_RESPONSE = 64 * 1024 # bodies up to this leave in one write with the head

  BINARY = Encoding::BINARY
  EMPTY = "".b.freeze
  CRLF = "\r\n"
  CONTINUE = "HTTP/1.1 100 Continue\r\n\r\n"
  LAST_CHUNK = "0\r\n\r\n"
  SERVER_SOFTWARE = "monodon"
  PROTOCOLS = ["HTTP/1.0", "HTTP/1.1"].freeze

  HOP_BY_HOP = %w[
    connection keep-alive transfer-encoding te trailer upgrade
    proxy-authenticate proxy-authorization
  ].to_h { |name| [name, true] }.freeze

  REASONS = {
    100 => "Continue", 101 => "Switching Protocols", 200 => "OK", 201 => "Created",
    202 => "Accepted", 204 => "No Content", 206 => "Partial Content",
    301 => "Moved Permanently", 302 => "Found", 303 => "See Other", 304 => "Not Modified",
    307 => "Temporary Redirect", 308 => "Permanent Redirect", 400 => "Bad Request",
    401 => "Unauthorized", 403 => "Forbidden", 404 => "Not Found",
    405 => "Method Not Allowed", 408 => "Request Timeout", 409 => "Conflict", 410 => "Gone",
    413 => "Content Too Large", 415 => "Unsupported Media Type", 422 => "Unprocessable Content",
    429 => "Too Many Requests", 431 => "Request Header Fields Too Large",
    500 => "Internal Server Error", 501 => "Not Implemented", 502 => "Bad Gateway",
    503 => "Service Unavailable", 504 => "Gateway Timeout"
  }.freeze

  # The supervisor sent something this worker cannot follow.
  class ProtocolError < StandardError; end

  # The client's body broke its framing, or stalled: answer `status`.
  class ClientError < StandardError
    attr_reader :status

    def initialize(status, reason)
      super(reason)
      @status = status
    end
  end

  # Writing to the client failed (it went away, or stopped reading).
  class ClientGone < StandardError; end

  def self.log(message)
    $stderr.write("monodon-rack[#{Process.pid}]: #{message}\n")
  end

  def self.monotonic_us
    Process.clock_gettime(Process::CLOCK_MONOTONIC, :microsecond)
  end

  # --- System calls Ruby has no method for (through Fiddle) ---------------

  module Libc
    HANDLE = Fiddle::Handle::DEFAULT
    T = Fiddle

    def self.function(name, args, ret)
      Fiddle::Function.new(HANDLE[name], args, ret, need_gvl: true)
    end

    MADVISE = function("madvise", [T::TYPE_VOIDP, T::TYPE_SIZE_T, T::TYPE_INT], T::TYPE_INT)
    PRCTL = function("prctl", [T::TYPE_INT, T::TYPE_LONG, T::TYPE_LONG, T::TYPE_LONG, T::TYPE_LONG], T::TYPE_INT)
    DUP2 = function("dup2", [T::TYPE_INT, T::TYPE_INT], T::TYPE_INT)
    CLOSE = function("close", [T::TYPE_INT], T::TYPE_INT)
    RECVMSG = function("recvmsg", [T::TYPE_INT, T::TYPE_INTPTR_T, T::TYPE_INT], T::TYPE_SSIZE_T) # the msghdr's address
    SENDFILE = function("sendfile", [T::TYPE_INT, T::TYPE_INT, T::TYPE_VOIDP, T::TYPE_SIZE_T], T::TYPE_SSIZE_T)

    MADV_DONTFORK = 10
    PR_SET_PDEATHSIG = 1
    MSG_DONTWAIT = 0x40
    MSG_CTRUNC = 0x08
    MSG_TRUNC = 0x20
    MSG_CMSG_CLOEXEC = 0x40000000
    SOL_SOCKET = 1
    SCM_RIGHTS = 1

    def self.dup2(from, to)
      DUP2.call(from, to) >= 0 or raise SystemCallError.new("dup2 #{from} to #{to}", Fiddle.last_error)
    end

    def self.close(fd)
      CLOSE.call(fd)
    end
  end

  # A worker must not outlive its supervisor (PROTOCOL.md, Start-up).
  def self.die_with_supervisor(supervisor_pid)
    begin
      Libc::PRCTL.call(Libc::PR_SET_PDEATHSIG, Signal.list.fetch("TERM"), 0, 0, 0)
    rescue StandardError
      nil # best effort
    end
    exit!(1) if supervisor_pid.positive? && Process.ppid != supervisor_pid
  end

  # What the supervisor tells a worker in its environment.
  class Settings
    attr_reader :supervisor_pid, :generation, :max_requests, :min_body_rate, :io_timeout,
                :max_head, :max_body, :buffered_body, :access_log, :access_log_format

    def initialize(env)
      @supervisor_pid = number(env, "MONODON_SUPERVISOR_PID", 0)
      @generation = number(env, "MONODON_GENERATION", 0)
      @max_requests = number(env, "MONODON_MAX_REQUESTS", 0)
      @min_body_rate = number(env, "MONODON_MIN_BODY_RATE", 0)
      @io_timeout = [1, number(env, "MONODON_IO_TIMEOUT", 30)].max
      limits = env.fetch("MONODON_LIMITS", "4094,8190,100,65536,1073741824,65536")
      fields = limits.split(",").map { |f| Integer(f, 10, exception: false) }
      if fields.size < 6 || fields.any?(&:nil?)
        abort("MONODON_LIMITS=#{limits.inspect} is not valid (see PROTOCOL.md)")
      end
      @max_head, @max_body, @buffered_body = fields.values_at(3, 4, 5)
      @access_log = env["MONODON_ACCESS_LOG"]
      @access_log = nil if @access_log&.empty?
      @access_log_format = env.fetch("MONODON_ACCESS_LOG_FORMAT", "combined")
    end

    def max_message
      2 * max_head + buffered_body + 64 * 1024
    end

    private

    def number(env, name, default)
      value = env[name]
      return default if value.nil?

      Integer(value, 10, exception: false) or abort("#{name}=#{value.inspect} is not valid (see PROTOCOL.md)")
    end
  end

  # --- The scoreboard -----------------------------------------------------

  # The worker's shared page: aligned 8-byte stores the supervisor reads
  # (the minimal profile's fields, plus the optional response counts). The
  # words only this worker writes are mirrored here, so a change is one
  # store and no load. Mapped as an IO::Buffer, whose get_value/set_value
  # cost a quarter of a Fiddle::Pointer store (which packs a String).
  class Scoreboard
    SIZE = 4096

    def initialize(fd)
      file = File.for_fd(fd, "r+", autoclose: false)
      @page = Scoreboard.map(file)
      Scoreboard.keep_from_children(file)
      @written = load(BYTES_WRITTEN)
      @requests = load(REQUESTS)
      @seq = load(REQUEST_SEQ)
      @responses = Array.new(5) { |i| load(RESPONSES + 8 * i) }
      @durations = Array.new(17) { |i| load(DURATIONS + 8 * i) }
      @duration_sum = load(DURATION_SUM)
    end

    # IO::Buffer is "experimental" in Ruby 3.1 to 3.3, and says so once.
    def self.map(file)
      warn = Warning[:experimental]
      Warning[:experimental] = false
      IO::Buffer.map(file, SIZE, 0, 0) # shared, read-write
    ensure
      Warning[:experimental] = warn
    end

    # MADV_DONTFORK, so that processes the app forks never see the page: its
    # address from /proc/self/maps (best effort, as IO::Buffer does not tell).
    def self.keep_from_children(file)
      inode = file.stat.ino
      File.foreach("/proc/self/maps") do |line|
        range, mode, _offset, _device, node = line.split(" ", 6)
        next unless node.to_i == inode && mode.end_with?("s")

        from, to = range.split("-").map { |a| a.to_i(16) }
        Libc::MADVISE.call(from, to - from, Libc::MADV_DONTFORK)
      end
    rescue SystemCallError, IOError
      nil
    end

    # Counted before the bytes go out: a worker that dies mid-write must not
    # have the supervisor answer 502 after part of a response.
    def add_written(n)
      @page.set_value(:u64, BYTES_WRITTEN, @written += n)
    end

    def begin_connection(conn_id)
      @page.set_value(:u64, CONN_BASE, @written)
      @page.set_value(:u64, CONN_ID, conn_id)
    end

    def begin_request(line)
      length = line.bytesize > REQUEST_LINE_MAX ? REQUEST_LINE_MAX : line.bytesize
      @page.set_value(:u64, REQUEST_SEQ, @seq += 1) # odd: being written
      @page.set_string(line, REQUEST_LINE, length)
      @page.set_value(:u64, REQUEST_LEN, length)
      @page.set_value(:u64, REQUEST_SEQ, @seq += 1)
      @page.set_value(:u64, STARTED_MS, [1, Process.clock_gettime(Process::CLOCK_MONOTONIC, :millisecond)].max)
    end

    def end_request(status, took_us)
      if status >= 100 && status <= 599
        i = status / 100 - 1
        @page.set_value(:u64, RESPONSES + 8 * i, @responses[i] += 1)
      end
      bucket = 0
      bucket += 1 while bucket < DURATION_BOUNDS_US.size && DURATION_BOUNDS_US[bucket] < took_us
      @page.set_value(:u64, DURATIONS + 8 * bucket, @durations[bucket] += 1)
      @page.set_value(:u64, DURATION_SUM, @duration_sum += took_us)
      @page.set_value(:u64, STARTED_MS, 0)
      @page.set_value(:u64, REQUESTS, @requests += 1)
    end

    def draining?
      @page.get_value(:u64, DRAINING) != 0
    end

    def limit_held?
      @page.get_value(:u64, HOLD_LIMIT) != 0
    end

    private

    def load(offset)
      @page.get_value(:u64, offset)
    end
  end

  # --- The channel --------------------------------------------------------

  # fd 3: messages are single sendmsg/recvmsg calls. Received through
  # libc's recvmsg into one buffer kept for the worker's life (Ruby's own
  # recvmsg allocates a buffer of the largest message for each one), with
  # the descriptors as plain numbers.
  class Channel
    # One block: struct msghdr (56 bytes on LP64), its iovec, then room for
    # the control messages (a few descriptors).
    HEADER_SIZE = 56
    IOV_AT = 56
    CONTROL_AT = 72
    CONTROL_SIZE = 64
    ONE_FD_CONTROL = 24 # CMSG_SPACE(4): one SCM_RIGHTS message with one descriptor

    def initialize(fd, max_message)
      raise "this worker needs a 64-bit Linux" unless Fiddle::SIZEOF_VOIDP == 8

      @fd = fd
      @io = Socket.for_fd(fd)
      @io.autoclose = false # fd 3 is replaced under it in a forked worker
      @buffer = Fiddle::Pointer.malloc(max_message, Fiddle::RUBY_FREE)
      @block = Fiddle::Pointer.malloc(CONTROL_AT + CONTROL_SIZE, Fiddle::RUBY_FREE)
      @address = @block.to_i # an Integer argument costs Fiddle no conversion call
      @block[IOV_AT, 16] = [@buffer.to_i, max_message].pack("QQ")
      # msg_name, msg_namelen, msg_iov, msg_iovlen, msg_control, msg_controllen, msg_flags
      @blank_header = [0, 0, @address + IOV_AT, 1, @address + CONTROL_AT, CONTROL_SIZE, 0].pack("Q7").freeze
    end

    def post(kind, payload = EMPTY)
      message = [PROTOCOL_VERSION, kind].pack("CC")
      message << payload unless payload.empty?
      @io.send(message, 0)
    end

    # A message already framed with its version and kind.
    def post_raw(message)
      @io.send(message, 0)
    end

    # One message and its descriptors; nil once the channel is closed.
    def receive(max_fds)
      loop do
        @block[0, HEADER_SIZE] = @blank_header
        n = Libc::RECVMSG.call(@fd, @address, Libc::MSG_CMSG_CLOEXEC | Libc::MSG_DONTWAIT)
        if n.negative?
          errno = Fiddle.last_error
          if errno == Errno::EAGAIN::Errno
            @io.wait_readable # in Ruby, where signals are seen
            next
          end
          next if errno == Errno::EINTR::Errno

          raise SystemCallError.new("recvmsg on the channel", errno)
        end
        # msg_controllen, msg_flags, and the first control message's
        # length, level, type and descriptor, in one read.
        control_len, flags, cmsg_len, level, type, first_fd =
          @block[40, CONTROL_AT + 20 - 40].unpack("Q<L<@32Q<l<L<l<")
        fds =
          if control_len == ONE_FD_CONTROL && cmsg_len == 20 && level == Libc::SOL_SOCKET && type == Libc::SCM_RIGHTS
            [first_fd]
          else
            descriptors(control_len)
          end
        if (flags & (Libc::MSG_TRUNC | Libc::MSG_CTRUNC)).nonzero? || fds.size > max_fds
          fds.each { |fd| Libc.close(fd) }
          raise ProtocolError, "a message or its descriptors cut short"
        end
        return nil if n.zero? && fds.empty?

        return [@buffer.to_s(n), fds]
      end
    end

    private

    def descriptors(control_len)
      fds = []
      at = 0
      while at + 16 <= control_len
        len, level, type = @block[CONTROL_AT + at, 16].unpack("QlL")
        break if len < 16

        if level == Libc::SOL_SOCKET && type == Libc::SCM_RIGHTS
          fds.concat(@block[CONTROL_AT + at + 16, len - 16].unpack("l*"))
        end
        at += (len + 7) & ~7
      end
      fds
    end
  end

  # --- Requests -----------------------------------------------------------

  # A parsed request, as the supervisor sends it (PROTOCOL.md, Parsed
  # requests). Strings are binary, as the bytes came.
  class Request
    attr_reader :conn_id, :served, :client, :local, :minor_version, :flags, :framing, :length,
                :method, :target, :headers, :body, :rest

    def self.decode(message)
      unless message.getbyte(0) == PROTOCOL_VERSION && message.getbyte(1) == PARSED
        raise ProtocolError, "expected a parsed request, got kind #{message.getbyte(1).inspect}"
      end

      new(message)
    rescue ArgumentError, TypeError, NoMethodError
      raise ProtocolError, "a parsed request cut short or malformed"
    end

    def initialize(m)
      @conn_id, @served, n = m.unpack("Q<L<S<", offset: 2)
      @client = m.byteslice(16, n)
      at = 16 + n
      n = m.unpack1("S<", offset: at)
      @local = m.byteslice(at + 2, n)
      at += 2 + n
      @minor_version, @flags, @framing, @length, n = m.unpack("CCCQ<S<", offset: at)
      at += 13
      @method = m.byteslice(at, n)
      at += n
      n = m.unpack1("L<", offset: at)
      @target = m.byteslice(at + 4, n)
      at += 4 + n
      count = m.unpack1("S<", offset: at)
      at += 2
      @headers = Array.new(count)
      i = 0
      while i < count
        n = m.unpack1("S<", offset: at)
        name = m.byteslice(at + 2, n)
        at += 2 + n
        n = m.unpack1("L<", offset: at)
        @headers[i] = [name, m.byteslice(at + 4, n)]
        at += 4 + n
        i += 1
      end
      n = m.unpack1("L<", offset: at)
      @body = m.byteslice(at + 4, n)
      raise ProtocolError, "message truncated" unless @body && @body.bytesize == n

      at += 4 + n
      @rest = at == m.bytesize ? EMPTY : m.byteslice(at, m.bytesize)
    end

    def keep_alive?
      (@flags & KEEP_ALIVE).nonzero?
    end

    def expect_continue?
      (@flags & EXPECT_CONTINUE).nonzero?
    end

    def body_complete?
      (@flags & BODY_COMPLETE).nonzero?
    end

    def https?
      (@flags & HTTPS).nonzero?
    end

    def header(name)
      @headers.each { |n, v| return v if n.casecmp?(name) }
      nil
    end
  end

  # --- rack.input ---------------------------------------------------------

  # Everything a streamed body has decoded so far, so that the app can
  # rewind and read it again: in memory, then in an unlinked temp file.
  class Spool
    WINDOW = 64 * 1024

    attr_reader :size

    def initialize
      @data = String.new(encoding: BINARY)
      @file = nil
      @size = 0
    end

    def append(bytes)
      if @file
        @file.write(bytes)
      else
        @data << bytes
        spill if @data.bytesize > SPOOL_IN_MEMORY
      end
      @size += bytes.bytesize
    end

    def slice(at, length)
      return @data.byteslice(at, length) unless @file
      return EMPTY.dup if length.zero?

      window = window_at(at)
      if at - @window_at + length <= window.bytesize
        window.byteslice(at - @window_at, length)
      else
        @file.pread(length, at)
      end
    end

    # The offset of the first "\n" at or past `from`, or nil.
    def index_newline(from)
      return @data.index("\n", from) unless @file

      while from < @size
        window = window_at(from)
        i = window.index("\n", from - @window_at)
        return @window_at + i if i

        from = @window_at + window.bytesize
      end
      nil
    end

    def close
      @file&.close
      @file = nil
      @data = nil
    end

    private

    def spill
      @file = Tempfile.create("monodon-body")
      File.unlink(@file.path)
      @file.binmode
      @file.sync = true
      @file.write(@data)
      @data = nil
      @window = EMPTY
      @window_at = 0
    end

    def window_at(at)
      unless at >= @window_at && at < @window_at + @window.bytesize
        @window = @file.pread([WINDOW, @size - at].min, at)
        @window_at = at
      end
      @window
    end
  end

  # rack.input for a body the supervisor did not have whole: what it
  # buffered, then the connection; never past the body's end. Chunked
  # bodies are decoded here, as strictly as the supervisor decodes them.
  class Input
    attr_reader :extra, :error

    def initialize(request, sock, settings)
      @sock = sock
      @max_body = settings.max_body
      @min_rate = settings.min_body_rate
      @timeout = settings.io_timeout
      @continue_pending = request.expect_continue?
      @spool = Spool.new
      @pos = 0
      @extra = EMPTY # bytes read past the body: the next request's
      @error = nil # a ClientError the app may have swallowed
      @since = nil
      @received = 0
      @total = 0
      @buffer = String.new(capacity: 65_536, encoding: BINARY)
      if request.framing == FRAMING_LENGTH
        @chunked = false
        @remaining = request.length - request.body.bytesize
        @spool.append(request.body)
        @done = @remaining <= 0
      else
        @chunked = true
        @raw = request.body.dup
        @state = :size
        @chunk_left = 0
        @trailer_bytes = 0
        @done = false
      end
    end

    def finished?
      @done
    end

    # IO#read's contract: everything left (a String, "" at the end) without
    # a length; up to `length` bytes, nil at the end, with one.
    def read(length = nil, buffer = nil)
      if length.nil?
        fill until @done
        data = @spool.slice(@pos, @spool.size - @pos)
        @pos = @spool.size
      else
        raise ArgumentError, "negative length #{length} given" if length.negative?

        fill while @spool.size - @pos < length && !@done
        available = @spool.size - @pos
        if available.zero? && length.positive?
          buffer&.clear
          return nil
        end
        data = @spool.slice(@pos, [length, available].min)
        @pos += data.bytesize
      end
      return data unless buffer

      buffer.replace(data)
    end

    def gets
      from = @pos
      loop do
        newline = @spool.index_newline(from)
        if newline
          line = @spool.slice(@pos, newline + 1 - @pos)
          @pos = newline + 1
          return line
        end
        if @done
          return nil if @pos >= @spool.size

          return read
        end
        from = @spool.size
        fill
      end
    end

    def each
      while (line = gets)
        yield line
      end
      self
    end

    def rewind
      @pos = 0
    end

    # Reads what is left of the body, up to `most` bytes, without keeping
    # it: whether the body ended (so the connection can carry another
    # request).
    def drain(most)
      most -= fill(keep: false) while !@done && most.positive?
      @done
    end

    def release
      @spool.close
    end

    private

    # Decodes at least one more byte, or finds the end; how many.
    def fill(keep: true)
      data = @chunked ? decode_chunks : receive_length
      @spool.append(data) if keep && !data.empty?
      data.bytesize
    rescue ClientError => e
      @error = e
      raise
    end

    def receive_length
      data = receive
      if data.bytesize > @remaining
        @extra = data.byteslice(@remaining, data.bytesize)
        data = data.byteslice(0, @remaining)
      end
      @remaining -= data.bytesize
      @done = @remaining.zero?
      data
    end

    def receive
      if @continue_pending
        @continue_pending = false
        write_continue
      end
      # A client trickling its body holds a worker: past a grace period it
      # must average --min-body-rate, as for the Rust workers.
      now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      @since ||= now
      elapsed = now - @since
      if @min_rate.positive? && elapsed > BODY_RATE_GRACE && @received < @min_rate * elapsed
        raise ClientError.new(408, "request body sent too slowly")
      end

      loop do
        data = @sock.read_nonblock(65_536, @buffer, exception: false)
        case data
        when :wait_readable
          @sock.wait_readable(@timeout) or raise ClientError.new(408, "request body not received in time")
        when nil
          raise ClientError.new(400, "the client closed the connection inside the body")
        else
          @received += data.bytesize
          return data
        end
      end
    rescue SystemCallError, IOError => e
      raise ClientError.new(400, "reading the body: #{e.message}")
    end

    def write_continue
      data = CONTINUE
      loop do
        n = @sock.write_nonblock(data, exception: false)
        if n == :wait_writable
          @sock.wait_writable(@timeout) or raise ClientError.new(408, "the client does not read")
        elsif n == data.bytesize
          return
        else
          data = data.byteslice(n, data.bytesize - n)
        end
      end
    end

    def decode_chunks
      out = String.new(encoding: BINARY)
      until @done || !out.empty?
        @raw << receive unless step(out)
      end
      out
    end

    def line
      newline = @raw.index("\n")
      unless newline
        raise ClientError.new(400, "chunk size line too long") if @raw.bytesize > 4096

        return nil
      end
      line = @raw.slice!(0, newline + 1)
      if line.getbyte(-2) != 13 || line.index("\r") != line.bytesize - 2
        raise ClientError.new(400, "bare CR or LF in a chunked body")
      end

      line.byteslice(0, line.bytesize - 2)
    end

    # One step of the chunked decoder; false if it needs more bytes.
    def step(out)
      case @state
      when :size
        size_line = line or return false
        size = size_line.split(";", 2).first || EMPTY
        raise ClientError.new(400, "bad chunk size") unless size.match?(/\A\h{1,16}\z/)

        @chunk_left = size.to_i(16)
        raise ClientError.new(413, "request body too large") if @total + @chunk_left > @max_body

        @state = @chunk_left.zero? ? :trailers : :data
      when :data
        return false if @raw.empty?

        n = [@raw.bytesize, @chunk_left].min
        out << @raw.slice!(0, n)
        @chunk_left -= n
        @total += n
        @state = :crlf if @chunk_left.zero?
      when :crlf
        return false if @raw.bytesize < 2
        raise ClientError.new(400, "chunk data not followed by CRLF") unless @raw.start_with?(CRLF)

        @raw.slice!(0, 2)
        @state = :size
      else # trailer fields, up to the blank line; dropped, as the supervisor does
        trailer = line or return false
        @trailer_bytes += trailer.bytesize + 2
        raise ClientError.new(431, "trailers too large") if @trailer_bytes > 65_536

        if trailer.empty?
          @done = true
          @extra = @raw
          @raw = String.new(encoding: BINARY)
        end
      end
      true
    end
  end

  # --- One exchange -------------------------------------------------------

  # The Date header's value, made once a second.
  module Clock
    @second = nil
    @date = nil
    @field = nil

    def self.http_date
      now = Process.clock_gettime(Process::CLOCK_REALTIME, :second)
      if now != @second
        @second = now
        @date = Time.at(now).utc.strftime("%a, %d %b %Y %H:%M:%S GMT").freeze
        @field = "Date: #{@date}\r\n".freeze
      end
      @date
    end

    # The whole "Date: ...\r\n" line.
    def self.date_field
      http_date
      @field
    end
  end

  # `ip:port` / `[v6]:port` / `unix` as [host, port].
  def self.split_address(address)
    return [EMPTY, EMPTY] if address == "unix" || !address.include?(":")

    colon = address.rindex(":")
    host = address.byteslice(0, colon)
    host = host.byteslice(1, host.bytesize - 2) if host.start_with?("[")
    [host, address.byteslice(colon + 1, address.bytesize)]
  end

  # SERVER_NAME and SERVER_PORT from an authority (`host:port`). SERVER_NAME
  # is an authority too (Rack::Lint checks): an IPv6 address keeps its
  # brackets.
  def self.server_address(authority, https)
    name, port = authority.match(/\A(.*?)(?::(\d+))?\z/m).captures
    [(name.empty? ? "localhost" : name).freeze, (port || (https ? "443" : "80")).freeze]
  end

  # Rack 3's streaming body gets one of these: write as it goes.
  class Stream
    def initialize(exchange, input)
      @exchange = exchange
      @input = input
      @closed = false
    end

    def read(...)
      @input.read(...)
    end

    def write(data)
      data = data.to_s
      @exchange.write_body(data)
      data.bytesize
    end

    def <<(data)
      write(data)
      self
    end

    def flush
      @exchange.flush
      self
    end

    def close_read; end

    def close_write
      @closed = true
    end

    def close
      @closed = true
    end

    def closed?
      @closed
    end
  end

  # One request on one connection: the env, the response.
  class Exchange
    attr_reader :status, :headers, :sent_bytes, :keep, :after_reply, :response_finished, :env

    HEADER_KEYS = {} # header name as sent => its env key

    def initialize(worker, request, sock)
      @worker = worker
      @request = request
      @sock = sock
      @board = worker.board
      @timeout = worker.settings.io_timeout
      @status = 0
      @sent_bytes = 0
      @keep = false
      @chunked = false
      @length_left = nil
      @pending_head = nil
      @head_sent = false
      @head_only = request.method == "HEAD"
      @bodiless = false
      @after_reply = nil
      @response_finished = nil
      @env = nil
    end

    # The env (Rack SPEC). PATH_INFO and QUERY_STRING are as sent, not
    # percent-decoded, as every Rack server gives them: Rack and the
    # frameworks decode them.
    def environ(input)
      r = @request
      target = r.target
      query_at = target.index("?")
      path = query_at ? target.byteslice(0, query_at) : target
      if path.include?("://") # absolute-form: the path is what follows the authority
        after = path.byteslice(path.index("://") + 3, path.bytesize)
        slash = after.index("/")
        path = slash ? after.byteslice(slash, after.bytesize) : "/"
      end
      minor = r.minor_version.zero? ? 0 : 1
      env = @worker.env_template(r.local, minor, r.https?).dup
      env["REQUEST_METHOD"] = r.method
      env["PATH_INFO"] = path
      env["QUERY_STRING"] = query_at ? target.byteslice(query_at + 1, target.bytesize) : EMPTY
      env["SERVER_NAME"], env["SERVER_PORT"] = server_address if r.local == "unix"
      env["REMOTE_ADDR"], env["REMOTE_PORT"] = Monodon.split_address(r.client)
      env["REQUEST_URI"] = target
      env["rack.input"] = input
      env["rack.errors"] = $stderr
      env["rack.after_reply"] = @after_reply = []
      env["rack.response_finished"] = @response_finished = []
      add_fields(env, r.headers)
      env["HTTP_VERSION"] = PROTOCOLS[minor] # whatever a "Version" field said
      @env = env
    end

    # The head's fields as HTTP_* (and CONTENT_TYPE, CONTENT_LENGTH): a
    # repeated field combined, as one would be; names with "_" as
    # --underscore-headers says, and never in place of a name with "-".
    def add_fields(env, headers)
      underscored = nil
      headers.each do |name, value|
        key = HEADER_KEYS[name] # names with "_" are never kept there
        if key.nil?
          if name.include?("_")
            (underscored ||= []) << [name, value]
            next
          end
          key = Exchange.header_key(name)
        end
        add_field(env, key, value)
      end
      return unless underscored

      case @worker.underscore_headers
      when "refuse"
        raise ClientError.new(400, "header name with an underscore: #{underscored.first.first}")
      when "allow"
        from_dash = headers.filter_map { |name, _| Exchange.header_key(name) unless name.include?("_") }
        underscored.each do |name, value|
          key = Exchange.header_key(name)
          add_field(env, key, value) unless from_dash.include?(key)
        end
      end
    end

    def add_field(env, key, value)
      previous = env[key]
      if previous.nil?
        env[key] = value
      elsif key.start_with?("HTTP_")
        env[key] = previous + (key == "HTTP_COOKIE" ? "; " : ", ") + value
      else
        env[key] = value
      end
    end

    def self.header_key(name)
      key = name.upcase.tr("-", "_")
      key = "HTTP_#{key}" unless key == "CONTENT_TYPE" || key == "CONTENT_LENGTH"
      key.freeze
      HEADER_KEYS[name.dup.freeze] = key if HEADER_KEYS.size < 1000 && !name.include?("_")
      key
    end

    # A unix socket has no address of its own: the Host field names the
    # server, as the client saw it.
    def server_address
      Monodon.server_address(@request.header("host") || EMPTY, @request.https?)
    end

    # --- The response

    def respond(status, headers, body)
      @status = status.is_a?(Integer) ? status : Integer(status)
      raise ArgumentError, "status #{status.inspect} is not an HTTP status" unless @status.between?(100, 999)

      @headers = headers
      if body.instance_of?(Array) # first: an Array has no to_path
        send_array(body)
      elsif body.respond_to?(:to_path) && (path = body.to_path) && File.file?(path)
        send_file(path)
      elsif body.respond_to?(:each)
        send_head(nil)
        body.each { |part| write_body(part) } unless @head_only # a HEAD's body is never sent
      elsif body.respond_to?(:call)
        send_head(nil)
        body.call(Stream.new(self, @env["rack.input"]))
      else
        raise TypeError, "the body (#{body.class}) responds to neither each, to_path nor call"
      end
      finish
    end

    def send_array(parts)
      if parts.size == 1
        whole = bytes(parts[0])
        length = whole.bytesize
      else
        length = 0
        parts.each { |part| length += bytes(part).bytesize }
      end
      send_head(length)
      if length <= SMALL_RESPONSE && !@head_only && !@bodiless
        # One write for the head and the body.
        length = @length_left if @length_left < length
        whole ||= parts.join
        whole = whole.byteslice(0, length) if whole.bytesize > length
        @length_left -= whole.bytesize
        @sent_bytes += whole.bytesize
        emit(whole)
      else
        parts.each { |part| write_body(part) }
      end
    end

    def send_file(path)
      File.open(path, "rb") do |file|
        size = file.size
        send_head(size)
        flush
        next if @head_only || @bodiless

        left = @length_left ? [size, @length_left].min : size
        sent = sendfile(file, left)
        @length_left -= sent if @length_left
        @sent_bytes += sent
      end
    end

    # sendfile(2) from `file` to the client, waiting (up to the I/O timeout)
    # whenever its socket is full.
    def sendfile(file, count)
      total = 0
      out = @sock.fileno
      source = file.fileno
      while total < count
        left = count - total
        @board.add_written(left)
        n = Libc::SENDFILE.call(out, source, nil, left)
        if n.negative?
          @board.add_written(-left)
          errno = Fiddle.last_error
          if errno == Errno::EAGAIN::Errno
            wait_writable
            next
          end
          next if errno == Errno::EINTR::Errno
          raise ClientGone, SystemCallError.new("sendfile", errno).message if total.positive? || !fallback?(errno)

          # A file sendfile cannot send: copied by Ruby instead.
          file.seek(0)
          @board.add_written(left)
          return IO.copy_stream(file, @sock, left)
        end
        @board.add_written(n - left)
        break if n.zero?

        total += n
      end
      total
    end

    def fallback?(errno)
      [Errno::EINVAL::Errno, Errno::ENOSYS::Errno, Errno::EOPNOTSUPP::Errno].include?(errno)
    end

    # What send_head does with a response field, by its name as the app
    # gave it (looked up in FIELD_KINDS, so that a name is downcased once).
    FIELD_KINDS = {}

    def self.field_kind(name)
      lower = name.downcase
      kind =
        if lower == "connection" then :connection
        elsif HOP_BY_HOP[lower] then :hop_by_hop
        elsif lower == "content-length" then :content_length
        elsif lower == "date" then :date
        elsif lower == "rack.hijack" then :hijack
        else :field
        end
      FIELD_KINDS[name] = kind if FIELD_KINDS.size < 1000 # the Hash keeps a frozen copy
      kind
    end

    def send_head(known_length)
      r = @request
      keep = r.keep_alive? && !@board.draining?
      minor = r.minor_version
      @bodiless = @status < 200 || @status == 204 || @status == 304
      head = +@worker.status_line(minor, @status)
      declared = nil
      dated = false
      @headers.each do |name, value|
        name = name.to_s
        case FIELD_KINDS[name] || Exchange.field_kind(name)
        when :field
          # The common case, a single-line String, here; add_header does the rest.
          if value.instance_of?(String) && !value.include?("\n") && !value.include?("\r") && value.ascii_only?
            head << name << ": " << value << CRLF
            next
          end
        when :connection
          keep = false if value.to_s.downcase.include?("close")
          next
        when :hop_by_hop
          next
        when :content_length
          declared = content_length(value)
          keep = false if declared.nil? || declared.negative?
        when :date
          dated = true
        when :hijack
          raise NotImplementedError, "monodon does not support hijacking (a rack.hijack response header)"
        end
        add_header(head, name, value)
      end
      head << Clock.date_field unless dated
      if @bodiless
        nil
      elsif declared
        @length_left = declared
      elsif known_length
        @length_left = known_length
        head << "Content-Length: " << known_length.to_s << CRLF
      elsif @head_only
        nil
      elsif minor >= 1
        @chunked = true
        head << "Transfer-Encoding: chunked\r\n"
      else
        keep = false
      end
      if !keep
        head << "Connection: close\r\n"
      elsif minor.zero?
        head << "Connection: keep-alive\r\n"
      end
      head << CRLF
      @keep = keep
      @head_sent = true
      # The head waits for the first piece of body, so that a small
      # response is one write.
      @pending_head = head
    end

    # The app's content-length, or nil if it is not a number.
    def content_length(value)
      Integer(value.to_s, 10)
    rescue ArgumentError
      nil
    end

    # A Rack 2 value with "\n" is one field per line; a Rack 3 Array, one
    # per element.
    def add_header(head, name, value)
      if value.is_a?(Array)
        value.each { |v| add_header(head, name, v) }
        return
      end
      value = value.to_s
      raise ArgumentError, "the header #{name} has a CR in its value" if value.include?("\r")

      value = value.b unless value.ascii_only?
      if value.include?("\n")
        value.split("\n").each { |v| head << name << ": " << v << CRLF }
      else
        head << name << ": " << value << CRLF
      end
    end

    def write_body(data)
      raise TypeError, "the body yielded a #{data.class}, not a String" unless data.is_a?(String)

      send_head(nil) unless @head_sent
      return flush if data.empty? || @head_only || @bodiless

      if @length_left
        data = data.byteslice(0, @length_left) if data.bytesize > @length_left
        @length_left -= data.bytesize
        return flush if data.empty?
      end
      @sent_bytes += data.bytesize
      if @chunked
        chunk = "#{data.bytesize.to_s(16)}\r\n"
        if data.bytesize > SMALL_RESPONSE
          emit(chunk)
          emit(data)
          emit(CRLF)
        else
          emit(concat(concat(chunk, data), CRLF))
        end
      else
        emit(data)
      end
    end

    def finish
      send_head(0) unless @head_sent
      if @chunked && !@head_only
        emit(LAST_CHUNK)
      else
        flush
      end
      @keep = false if @length_left&.positive? # the app sent less than it said: the client must not wait
    end

    def flush
      emit(EMPTY) if @pending_head
    end

    def emit(data)
      if (head = @pending_head)
        @pending_head = nil
        data = concat(head, data)
      end
      @board.add_written(data.bytesize)
      write_all(data)
    end

    # No byte of the response has gone out: another can be sent.
    def nothing_sent?
      !@head_sent || !@pending_head.nil?
    end

    # A response before or instead of the app's (its body broke framing, or
    # the app failed before sending anything).
    def refuse(status, reason)
      @status = status
      @pending_head = nil
      @keep = false
      reason_phrase = REASONS.fetch(status, "Error")
      body = "#{status} #{reason_phrase}: #{reason}\n"
      data = "HTTP/1.1 #{status} #{reason_phrase}\r\nContent-Type: text/plain\r\n" \
             "Content-Length: #{body.bytesize}\r\nConnection: close\r\n\r\n#{body}"
      @sent_bytes = data.bytesize
      @board.add_written(data.bytesize)
      write_all(data)
    rescue ClientGone
      nil
    end

    private

    def bytes(part)
      raise TypeError, "the body holds a #{part.class}, not a String" unless part.is_a?(String)

      part
    end

    def concat(head, data)
      head << data
    rescue Encoding::CompatibilityError
      head.force_encoding(BINARY) << data.b
    end

    def write_all(data)
      loop do
        n = @sock.write_nonblock(data, exception: false)
        if n == :wait_writable
          wait_writable
        elsif n == data.bytesize
          return
        else
          data = data.byteslice(n, data.bytesize - n)
        end
      end
    rescue SystemCallError, IOError => e
      raise ClientGone, e.message
    end

    def wait_writable
      @sock.wait_writable(@timeout) or raise ClientGone, "the client does not read"
    end
  end

  # --- The access log -----------------------------------------------------

  # The same lines the Rust workers write (proto/src/access_log.rs).
  class AccessLog
    def initialize(path, format)
      @path = path
      @format = format
      @file = nil
      require "json" if format == "json"
      reopen
    end

    def reopen
      if @path == "-"
        @file = $stdout
      else
        @file&.close
        @file = File.open(@path, "a")
        @file.sync = true
      end
    end

    def write(client, request, status, size, took_us, generation)
      referer = text(request.header("referer"))
      agent = text(request.header("user-agent"))
      method = text(request.method)
      target = text(request.target)
      version = request.minor_version.zero? ? "HTTP/1.0" : "HTTP/1.1"
      line =
        if @format == "json"
          JSON.generate({
                          "time" => Clock.http_date, "peer" => text(client), "method" => method,
                          "target" => target, "version" => version, "status" => status, "bytes" => size,
                          "referer" => referer, "user_agent" => agent, "duration_us" => took_us,
                          "pid" => Process.pid, "generation" => generation
                        }, ascii_only: true)
        else
          host = client.include?(":") ? client.byteslice(0, client.rindex(":")).delete("[]") : client
          stamp = Time.now.utc.strftime("%d/%b/%Y:%H:%M:%S +0000")
          "#{host} - - [#{stamp}] \"#{quote(method)} #{quote(target)} #{version}\" #{status} #{size} " \
            "\"#{quote(referer)}\" \"#{quote(agent)}\" #{took_us}"
        end
      @file.write(line << "\n")
    end

    private

    # Bytes as latin-1 characters, written as UTF-8 (as the Python worker does).
    def text(bytes)
      return nil if bytes.nil?
      return bytes.dup.force_encoding(Encoding::UTF_8) if bytes.ascii_only?

      bytes.dup.force_encoding(Encoding::ISO_8859_1).encode(Encoding::UTF_8)
    end

    def quote(s)
      return "-" if s.nil?

      s.gsub(/["\\\x00-\x1f\x7f]/) { |c| c == '"' || c == "\\" ? "\\#{c}" : format("\\x%02x", c.ord) }
    end
  end

  # --- The worker ---------------------------------------------------------

  class Worker
    attr_reader :board, :settings, :underscore_headers, :retire_callable, :rack_version

    def initialize(app, settings, underscore_headers)
      @app = app
      @settings = settings
      @underscore_headers = underscore_headers
      @board = Scoreboard.new(SCOREBOARD_FD)
      @channel = Channel.new(CHANNEL_FD, settings.max_message)
      @access_log = settings.access_log && AccessLog.new(settings.access_log, settings.access_log_format)
      Signal.trap("USR1") { @access_log&.reopen }
      @remaining = settings.max_requests.positive? ? settings.max_requests : nil
      @retire = false
      @retire_callable = -> { @retire = true } # the app's wish that this worker leave after the response
      @rack_version = defined?(::Rack::VERSION) && ::Rack::VERSION.is_a?(Array) ? ::Rack::VERSION : [1, 3]
      @rack_version = @rack_version.dup.freeze
      @reasons = defined?(::Rack::Utils::HTTP_STATUS_CODES) ? ::Rack::Utils::HTTP_STATUS_CODES : REASONS
      @status_lines = [{}, {}]
      @server_addresses = {}
      @env_templates = {}
    end

    # The env entries every request on a listener shares for an HTTP
    # version and scheme, made once and frozen: a request's env is a copy,
    # cheaper than a literal of two dozen entries (no key is hashed again).
    # The entries a request sets are there too, so that its copy does not
    # grow.
    def env_template(local, minor, https)
      templates = (@env_templates[local] ||= Array.new(4))
      templates[2 * minor + (https ? 1 : 0)] ||= begin
        protocol = PROTOCOLS[minor]
        server_name, server_port = local == "unix" ? [EMPTY, EMPTY] : server_address(local)
        {
          "REQUEST_METHOD" => EMPTY,
          "SCRIPT_NAME" => EMPTY,
          "PATH_INFO" => EMPTY,
          "QUERY_STRING" => EMPTY,
          "SERVER_NAME" => server_name,
          "SERVER_PORT" => server_port,
          "SERVER_PROTOCOL" => protocol,
          "SERVER_SOFTWARE" => SERVER_SOFTWARE,
          "REMOTE_ADDR" => EMPTY,
          "REMOTE_PORT" => EMPTY,
          "REQUEST_URI" => EMPTY,
          "rack.version" => @rack_version,
          "rack.url_scheme" => https ? "https" : "http",
          "rack.input" => nil,
          "rack.errors" => nil,
          "rack.multithread" => false,
          "rack.multiprocess" => true,
          "rack.run_once" => false,
          "rack.hijack?" => false,
          "rack.after_reply" => nil,
          "rack.response_finished" => nil,
          "monodon.retire" => @retire_callable,
          "monodon.generation" => @settings.generation,
          "HTTP_VERSION" => protocol
        }.freeze
      end
    end

    # SERVER_NAME and SERVER_PORT of a listener's address, worked out once.
    def server_address(local)
      @server_addresses[local] ||= Monodon.server_address(local, false)
    end

    def status_line(minor, status)
      @status_lines[minor][status] ||=
        "HTTP/1.#{minor} #{status} #{@reasons.fetch(status) { REASONS.fetch(status, 'Unknown') }}\r\n".b.freeze
    end

    def run
      @channel.post(READY, [Process.pid, FEATURE_PARSED].pack("L<C"))
      loop do
        message, fds = @channel.receive(1)
        return 0 if message.nil?

        unless fds.size == 1
          fds.each { |fd| Libc.close(fd) }
          raise ProtocolError, "a request without its connection"
        end
        begin
          request = Request.decode(message)
        rescue ProtocolError
          Libc.close(fds[0])
          raise
        end
        return 0 if serve(request, fds[0])
      end
    end

    # Serves one request; whether the worker leaves after it.
    def serve(request, fd)
      last = !@remaining.nil? && @remaining <= 1 && !@board.limit_held?
      @channel.post(RETIRING) if last
      sock = Socket.for_fd(fd)
      @board.begin_connection(request.conn_id)
      @board.begin_request("#{request.method} #{request.target}")
      started = Monodon.monotonic_us
      exchange = Exchange.new(self, request, sock)
      keep, leftover = exchange_with_app(exchange, request, sock)
      took_us = Monodon.monotonic_us - started
      @board.end_request(exchange.status, took_us)
      @access_log&.write(request.client, request, exchange.status, exchange.sent_bytes, took_us,
                         @settings.generation)
      @remaining -= 1 if @remaining
      # Our copy goes before the Done: a close is final once the
      # supervisor closes its own.
      sock.close
      retire = @retire
      @retire = false
      @channel.post(RETIRING) if retire && !last
      done = [PROTOCOL_VERSION, DONE, request.conn_id, request.served + 1, keep ? 1 : 0].pack("CCQ<L<C")
      done << leftover if keep && !leftover.empty?
      @channel.post_raw(done)
      after_reply(exchange)
      last || retire
    end

    private

    # Runs the app; [keep the connection?, bytes past the request].
    def exchange_with_app(exchange, request, sock)
      # A body the supervisor had whole is read from memory; only one still
      # on the wire needs ours.
      input = request.body_complete? ? StringIO.new(request.body) : Input.new(request, sock, @settings)
      begin
        env = exchange.environ(input)
      rescue ClientError => e
        exchange.refuse(e.status, e.message)
        return [false, EMPTY]
      end
      body = nil
      begin
        status, headers, body = @app.call(env)
        exchange.respond(status, headers, body)
      rescue ClientError => e
        exchange.refuse(e.status, e.message) if exchange.nothing_sent?
        return [false, EMPTY]
      rescue ClientGone => e
        Monodon.log("writing to #{request.client}: #{e.message}") unless e.message.match?(/EPIPE|ECONNRESET|Broken pipe|reset by peer/)
        return [false, EMPTY]
      rescue StandardError, ScriptError => e
        Monodon.log("the app failed on #{request.method} #{request.target}:\n#{e.full_message(highlight: false)}")
        exchange.refuse(500, "the app failed; see the log") if exchange.nothing_sent?
        return [false, EMPTY]
      ensure
        close_body(body)
        reap_tempfiles(env)
      end
      keep = exchange.keep
      if input.is_a?(Input)
        keep &&= input.error.nil?
        if keep && !input.finished?
          keep = begin
            input.drain(MAX_DRAIN)
          rescue ClientError
            false
          end
        end
        leftover = request.rest.empty? ? input.extra : request.rest + input.extra
        input.release
      else
        leftover = request.rest
      end
      [keep, leftover]
    end

    def close_body(body)
      body.close if body.respond_to?(:close)
    rescue StandardError => e
      Monodon.log("the response body's close failed:\n#{e.full_message(highlight: false)}")
    end

    # The files the multipart parser spooled uploads to (rack.tempfiles) go
    # once the response is out, as Rack::TempfileReaper would have them go:
    # a worker serves on for thousands of requests, and would otherwise
    # leave one file behind for every upload.
    def reap_tempfiles(env)
      env["rack.tempfiles"]&.each do |file|
        file.close!
      rescue StandardError => e
        Monodon.log("removing an upload's temporary file failed: #{e.message}")
      end
    end

    def after_reply(exchange)
      exchange.after_reply&.each do |callable|
        callable.call
      rescue StandardError => e
        Monodon.log("a rack.after_reply callable failed:\n#{e.full_message(highlight: false)}")
      end
      return if exchange.response_finished.nil? || exchange.response_finished.empty?

      exchange.response_finished.each do |callable|
        callable.call(exchange.env, exchange.status, exchange.headers, nil)
      rescue StandardError => e
        Monodon.log("a rack.response_finished callable failed:\n#{e.full_message(highlight: false)}")
      end
    end
  end

  # --- Loading config.ru --------------------------------------------------

  # A small Rack::Builder for when the rack library is not installed: run,
  # use, map and warmup, as config.ru files use them.
  class Builder
    def self.parse_file(path)
      source = File.read(path).sub(/^__END__\n.*\z/m, "")
      source = source.sub(/\A#\\.*$/, "") # rackup's options line
      # rubocop:disable Security/Eval -- config.ru is Ruby, evaluated as rackup does
      eval("Monodon::Builder.new {\n#{source}\n}.to_app", TOPLEVEL_BINDING, path, 0)
      # rubocop:enable Security/Eval
    end

    def initialize(&block)
      @middleware = []
      @run = nil
      @map = nil
      @warmup = nil
      instance_eval(&block) if block
    end

    def use(middleware, *args, &block)
      @middleware << ->(app) { middleware.new(app, *args, &block) }
    end
    ruby2_keywords(:use)

    def run(app = nil, &block)
      @run = app || block
    end

    def map(path, &block)
      (@map ||= {})[path] = block
    end

    def warmup(callable = nil, &block)
      @warmup = callable || block
    end

    def to_app
      app = @run
      if @map
        mapping = @map.transform_values { |block| Builder.new(&block).to_app }
        mapping["/"] ||= @run if @run
        app = URLMap.new(mapping)
      end
      raise ArgumentError, "config.ru has neither run nor map" unless app

      app = @middleware.reverse.inject(app) { |inner, wrap| wrap.call(inner) }
      @warmup&.call(app)
      app
    end
  end

  # `map`: the app for the longest matching path prefix, with SCRIPT_NAME
  # and PATH_INFO moved along.
  class URLMap
    def initialize(mapping)
      @mapping = mapping.map { |location, app| [location.chomp("/"), app] }.sort_by { |l, _| -l.bytesize }
    end

    def call(env)
      path = env["PATH_INFO"]
      script_name = env["SCRIPT_NAME"]
      @mapping.each do |location, app|
        next unless path == location || path.start_with?("#{location}/") || location.empty?

        env["SCRIPT_NAME"] = script_name + location
        env["PATH_INFO"] = path.byteslice(location.bytesize, path.bytesize)
        begin
          return app.call(env)
        ensure
          env["SCRIPT_NAME"] = script_name
          env["PATH_INFO"] = path
        end
      end
      [404, { "content-type" => "text/plain", "x-cascade" => "pass" }, ["Not Found: #{path}\n"]]
    end
  end

  # Blocks that config.ru hands to Monodon.after_fork: run in each worker
  # after its fork, before it serves (reconnect to databases there), as
  # Unicorn's after_fork and Puma's on_worker_boot are.
  AFTER_FORK = []

  def self.after_fork(&block)
    raise ArgumentError, "Monodon.after_fork needs a block" unless block

    AFTER_FORK << block
  end

  # The app config.ru builds: with Rack's builder if there is one.
  def self.load_app(path)
    path = File.expand_path(path)
    begin
      require "rack"
      require "rack/builder"
    rescue LoadError
      return Builder.parse_file(path)
    end
    app = ::Rack::Builder.parse_file(path)
    app.is_a?(Array) ? app.first : app # Rack 2 gives [app, options], Rack 3 the app
  end

  # Loads the app, or exits with why: the supervisor logs it and starts the
  # template again with back-off.
  def self.load_app_or_exit(path)
    load_app(path)
  rescue StandardError, ScriptError => e
    log("could not load #{path}:\n#{e.full_message(highlight: false)}")
    $stderr.flush
    exit!(1)
  end

  # --- The template -------------------------------------------------------

  # The template role (PROTOCOL.md, Templates): config.ru loaded once, then
  # a worker forked for each Fork, twice so that the supervisor (a child
  # subreaper) is its parent.
  class Template
    def initialize(options, settings)
      @options = options
      @settings = settings
    end

    def run
      app = @options[:no_preload] ? nil : Monodon.load_app_or_exit(@options[:app])
      warm_up
      channel = Channel.new(CHANNEL_FD, 1 << 16)
      channel.post(TEMPLATE_READY, [Process.pid].pack("L<"))
      loop do
        message, fds = channel.receive(2)
        return 0 if message.nil?
        unless message.getbyte(0) == PROTOCOL_VERSION && message.getbyte(1) == FORK && fds.size == 2
          raise ProtocolError, "expected Fork with two descriptors"
        end

        variables = fork_variables(message)
        if Thread.list.size > 1
          channel.post(FORK_FAILED, "the app started threads in the template; a fork copies only one".b)
        elsif (pid = fork_worker(fds, variables, app))
          channel.post(FORKED, [pid].pack("L<"))
        else
          channel.post(FORK_FAILED, "fork failed".b)
        end
        fds.each { |fd| Libc.close(fd) }
      end
    end

    private

    # Compacted once here, so the workers share the pages as they are.
    def warm_up
      if Process.respond_to?(:warmup)
        Process.warmup
      else
        GC.start
        GC.compact if GC.respond_to?(:compact)
      end
    rescue NotImplementedError
      nil
    end

    def fork_variables(message)
      variables = {}
      at = 4
      message.unpack1("S<", offset: 2).times do
        n = message.unpack1("S<", offset: at)
        name = message.byteslice(at + 2, n).force_encoding(Encoding::UTF_8)
        at += 2 + n
        m = message.unpack1("L<", offset: at)
        variables[name] = message.byteslice(at + 4, m).force_encoding(Encoding::UTF_8)
        at += 4 + m
      end
      variables
    end

    # Forks a worker through a middle process; its pid, or nil.
    def fork_worker(fds, variables, app)
      reader, writer = IO.pipe
      middle = Process.fork
      if middle.nil?
        reader.close
        begin
          worker = Process.fork
          if worker.nil?
            writer.close
            code = become_worker(fds, variables, app)
            $stdout.flush
            $stderr.flush
            exit!(code)
          end
          writer.write([worker].pack("L<"))
        ensure
          exit!(0)
        end
      end
      writer.close
      data = reader.read(4)
      reader.close
      Process.waitpid(middle)
      data && data.bytesize == 4 ? data.unpack1("L<") : nil
    rescue SystemCallError
      nil
    end

    # In the forked worker: wait for the supervisor to adopt us, take the
    # Fork's descriptors and variables, and serve.
    def become_worker(fds, variables, app)
      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 5
      until Process.ppid == @settings.supervisor_pid
        return 1 if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

        sleep(0.0002)
      end
      Libc.dup2(fds[0], CHANNEL_FD)
      Libc.dup2(fds[1], SCOREBOARD_FD)
      fds.each { |fd| Libc.close(fd) unless fd == CHANNEL_FD || fd == SCOREBOARD_FD }
      ENV.update(variables)
      ENV.delete("MONODON_ROLE")
      settings = Settings.new(ENV)
      Monodon.serve_as_worker(app || Monodon.load_app_or_exit(@options[:app]), @options, settings)
    rescue SignalException => e
      # Killed (e.g. past --timeout): die of the signal, as the app would.
      Signal.trap(e.signo, "DEFAULT")
      Process.kill(e.signo, Process.pid)
      sleep(1)
      1
    rescue Exception => e # rubocop:disable Lint/RescueException -- the forked worker's last word
      log_exit(e)
    end

    def log_exit(error)
      Monodon.log(error.full_message(highlight: false)) unless error.is_a?(SystemExit)
      error.is_a?(SystemExit) ? error.status : 1
    end
  end

  def self.serve_as_worker(app, options, settings)
    die_with_supervisor(settings.supervisor_pid)
    srand # each worker its own random numbers, not the template's
    AFTER_FORK.each(&:call)
    Worker.new(app, settings, options[:underscore_headers]).run
  rescue ProtocolError => e
    log("protocol error: #{e.message}")
    1
  end

  def self.main(argv)
    options = { no_preload: false, underscore_headers: "drop" }
    parser = OptionParser.new do |o|
      o.banner = "usage: monodon-rack --app CONFIG.RU [--underscore-headers drop|refuse|allow] [--no-preload]"
      o.on("--app FILE", "the rackup file") { |v| options[:app] = v }
      o.on("--underscore-headers POLICY", %w[drop refuse allow]) { |v| options[:underscore_headers] = v }
      o.on("--no-preload", "load the app in each worker") { options[:no_preload] = true }
    end
    parser.parse!(argv)
    abort(parser.banner) unless options[:app]
    abort("started by `monodon serve --rack`, not by hand") unless ENV["MONODON_CHANNEL_FD"]
    settings = Settings.new(ENV)
    return Template.new(options, settings).run if ENV["MONODON_ROLE"] == "template"

    die_with_supervisor(settings.supervisor_pid)
    serve_as_worker(Monodon.load_app_or_exit(options[:app]), options, settings)
  end
end

if $PROGRAM_NAME == __FILE__
  $stdout.sync = true
  begin
    exit(Monodon.main(ARGV))
  rescue Monodon::ProtocolError => e
    Monodon.log("protocol error: #{e.message}")
    exit(1)
  end
end
