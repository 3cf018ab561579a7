# config.ru as rackup takes it, loaded by the worker's own builder when the
# rack library is missing: use, map, run and warmup.

# Appends a suffix to each part of the body.
class Suffix
  def initialize(app, suffix)
    @app = app
    @suffix = suffix
  end

  def call(env)
    status, headers, body = @app.call(env)
    [status, headers, body.map { |part| part.chomp + @suffix + "\n" }]
  end
end

WARMED = []

warmup { |app| WARMED << app.class.name }
use Suffix, "!"

map "/api" do
  run ->(env) { [200, { "content-type" => "text/plain" }, ["api #{env['SCRIPT_NAME']} #{env['PATH_INFO']}"]] }
end

run(lambda do |env|
  rack = defined?(::Rack::Builder) ? "rack" : "no rack"
  [200, { "content-type" => "text/plain" }, ["root #{env['PATH_INFO']} #{rack} warmed=#{WARMED.size}"]]
end)
