"""A minimal Django project in one module (Debian's python3-django), served
by monodon's WSGI worker: settings, URLs, views and the WSGI application."""

from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="only-for-tests",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["*"],
    MIDDLEWARE=["django.middleware.common.CommonMiddleware"],
    DATA_UPLOAD_MAX_MEMORY_SIZE=None,
)

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse  # noqa: E402
from django.urls import path  # noqa: E402


def index(request):
    return HttpResponse("django index\n", content_type="text/plain")


def hello(request, name):
    return HttpResponse("hello %s\n" % name, content_type="text/plain")


def form(request):
    return JsonResponse({"name": request.POST["name"], "items": request.POST.getlist("item")})


def upload(request):
    f = request.FILES["file"]
    data = f.read()
    return JsonResponse({"filename": f.name, "length": len(data), "sum": sum(data) & 0xFFFFFFFF})


def stream(request):
    return StreamingHttpResponse(("row %d\n" % i for i in range(100)), content_type="text/plain")


urlpatterns = [
    path("", index),
    path("hello/<str:name>", hello),
    path("form", form),
    path("upload", upload),
    path("stream", stream),
]

application = get_wsgi_application()
