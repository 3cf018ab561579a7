"""A Flask app (Debian's python3-flask) served by monodon's WSGI worker."""

from flask import Flask, Response, request

app = Flask(__name__)


@app.route("/")
def index():
    return "flask index\n"


@app.route("/hello/<name>")
def hello(name):
    return "hello %s\n" % name


@app.route("/form", methods=["POST"])
def form():
    return {"name": request.form["name"], "items": request.form.getlist("item")}


@app.route("/upload", methods=["POST"])
def upload():
    f = request.files["file"]
    data = f.read()
    return {"filename": f.filename, "length": len(data), "sum": sum(data) & 0xFFFFFFFF}


@app.route("/stream")
def stream():
    def rows():
        for i in range(100):
            yield "row %d\n" % i

    return Response(rows(), mimetype="text/plain")
