# A WSGI app for gunicorn and uWSGI: answers with the pid of the process that served it.
import os


def app(environ, start_response):
    body = f"hello from pid {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


application = app
