# Rack apps that exercise every part of the Rack SPEC monodon's worker
# provides, wrapped in Rack::Lint: a breach of the SPEC by the server
# raises Rack::Lint::LintError in the app (a 500, and its message in the
# log, which the tests look for). Under /raw, what Lint would refuse: an
# app that fails, hijacking, a Rack 3 streaming body.

require "json"
require "tmpdir"
require "rack"
require "rack/lint"

# Where this file was loaded: the template, or with --no-preload the worker.
IMPORTED_IN = Process.pid
# The processes Monodon.after_fork ran in (each worker's own copy).
$after_fork = []
Monodon.after_fork { $after_fork << Process.pid } if defined?(Monodon)
MARKS = File.join(Dir.tmpdir, "monodon-rack-marks-#{Process.ppid}")

module Spec
  def self.json(doc, status = 200)
    body = "#{JSON.generate(doc)}\n"
    [status, { "Content-Type" => "application/json", "Content-Length" => body.bytesize.to_s }, [body]]
  end

  def self.param(env, name, default = nil)
    Rack::Utils.parse_query(env["QUERY_STRING"])[name] || default
  end

  def self.mark(what)
    File.open(MARKS, "a") { |f| f.puts(what) }
  end

  def self.marks(what)
    File.exist?(MARKS) ? File.readlines(MARKS, chomp: true).count(what) : 0
  end

  def self.digest(data)
    { "length" => data.bytesize, "sum" => data.sum(32), "lines" => data.count("\n") }
  end

  # A body whose close the server must call.
  class Closing
    def each
      yield "a\n"
      yield "b\n"
    end

    def close
      Spec.mark("closed")
    end
  end

  # A file body: the server may send it with sendfile(2). Its close
  # removes the file.
  class FileBody
    def initialize(size)
      @path = File.join(Dir.tmpdir, "monodon-rack-file-#{Process.pid}-#{rand(1 << 30)}")
      File.binwrite(@path, Array.new(size) { |i| (i % 251).chr }.join)
    end

    def to_path
      @path
    end

    def each
      File.open(@path, "rb") { |f| while (part = f.read(16_384)) do yield part end }
    end

    def close
      File.unlink(@path)
      Spec.mark("file closed")
    end
  end

  # Rows produced as they are sent.
  class Rows
    def initialize(count)
      @count = count
    end

    def each
      @count.times { |i| yield "part #{i}\n" }
    end
  end

  def self.read_body(env)
    input = env["rack.input"]
    case param(env, "how", "read")
    when "read" then data = input.read
    when "read-small"
      data = +""
      while (part = input.read(1000))
        data << part
      end
    when "buffer"
      data = +""
      buffer = +""
      data << buffer while input.read(4096, buffer)
    when "gets"
      data = +""
      while (line = input.gets)
        data << line
      end
    when "each"
      data = +""
      input.each { |line| data << line }
    when "rewind"
      first = input.read(100) || ""
      input.rewind
      data = input.read
      return json(digest(data).merge("first" => first.bytesize, "same" => data.start_with?(first)))
    end
    json(digest(data))
  end

  App = lambda do |env|
    case env["PATH_INFO"]
    when "/body" then read_body(env)
    when "/stream"
      [200, { "Content-Type" => "text/plain" }, Rows.new(Integer(param(env, "n", "5")))]
    when "/closing" then [200, { "Content-Type" => "text/plain" }, Closing.new]
    when "/after"
      env["rack.after_reply"] << -> { Spec.mark("after") }
      json({ "queued" => true })
    when "/marks"
      json({ "closed" => marks("closed"), "after" => marks("after"), "file closed" => marks("file closed") })
    when "/retire"
      env["monodon.retire"].call
      json({ "pid" => Process.pid })
    when "/random"
      sleep(Integer(param(env, "ms", "0")) / 1000.0)
      json({ "pid" => Process.pid, "random" => rand, "after_fork" => $after_fork })
    when "/status"
      code = Integer(param(env, "code", "404"))
      if code == 204 || code == 304
        [code, {}, []]
      else
        [code, { "Content-Type" => "text/plain" }, ["status #{code}\n"]]
      end
    when "/sleep"
      sleep(Integer(param(env, "ms", "100")) / 1000.0)
      json({ "slept" => true })
    when "/multi"
      [200, { "Content-Type" => "text/plain", "Set-Cookie" => "a=1\nb=2", "Content-Length" => "3" }, ["ok\n"]]
    else
      cgi = env.select { |k, v| v.is_a?(String) && !k.include?(".") }
      rack = {
        "version" => env["rack.version"], "url_scheme" => env["rack.url_scheme"],
        "multithread" => env["rack.multithread"], "multiprocess" => env["rack.multiprocess"],
        "run_once" => env["rack.run_once"], "hijack?" => env["rack.hijack?"],
        "hijack_present" => env.key?("rack.hijack"), "after_reply" => env["rack.after_reply"].class.name,
        "retire" => env["monodon.retire"].respond_to?(:call)
      }
      request = Rack::Request.new(env)
      env["rack.errors"].puts("environ seen for #{env['PATH_INFO']}")
      json({ "cgi" => cgi, "rack" => rack, "params" => request.GET, "pid" => Process.pid,
             "imported_in" => IMPORTED_IN, "path" => request.path })
    end
  end

  # Rack 3's streaming body: called with the stream.
  class Streaming
    def call(stream)
      3.times { |i| stream.write("streamed #{i}\n") }
      stream.close
    end
  end

  Raw = lambda do |env|
    case env["PATH_INFO"]
    when "/fail" then raise "this app fails on purpose"
    when "/hijack" then [200, { "rack.hijack" => ->(io) { io.close } }, []]
    when "/file" # Rack::Lint 2 hides to_path
      [200, { "Content-Type" => "application/octet-stream" }, FileBody.new(Integer(Spec.param(env, "size", "100000")))]
    when "/call" then [200, { "Content-Type" => "text/plain" }, Streaming.new]
    when "/pid" then [200, { "Content-Type" => "text/plain" }, ["#{Process.pid}\n"]]
    else [404, {}, ["no such raw route\n"]]
    end
  end
end

map "/raw" do
  run Spec::Raw
end
run Rack::Lint.new(Spec::App)
