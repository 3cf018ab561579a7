# A Sinatra app (Debian's ruby-sinatra): routes, a form, an upload and a
# streamed response.

require "json"
require "sinatra/base"

class SinatraApp < Sinatra::Base
  set :environment, :production
  set :show_exceptions, false

  get "/" do
    "sinatra index\n"
  end

  get "/hello/:name" do
    "hello #{params[:name]}\n"
  end

  post "/form" do
    content_type :json
    JSON.generate({ "name" => params["name"], "items" => params["item"] })
  end

  post "/upload" do
    file = params["file"]
    data = file[:tempfile].read
    content_type :json
    JSON.generate({ "filename" => file[:filename], "length" => data.bytesize, "sum" => data.sum(32) })
  end

  get "/stream" do
    content_type "text/plain"
    stream do |out|
      100.times { |i| out << "row #{i}\n" }
    end
  end
end
