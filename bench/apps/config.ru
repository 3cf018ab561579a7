# The Rack app Unicorn serves in bench/run: `200 hello\n` to everything.
# Run with `unicorn -E none` so no default middleware (logger, lint) is added;
# hence the explicit Content-Length.
run lambda { |_env|
  [200, { "content-type" => "text/plain", "content-length" => "6" }, ["hello\n"]]
}
