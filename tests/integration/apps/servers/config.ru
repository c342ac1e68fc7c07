# A Rack app for Puma: answers with the pid that served it.
run ->(env) { [200, { "content-type" => "text/plain" }, ["hello from pid #{Process.pid}\n"]] }
