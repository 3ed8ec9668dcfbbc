terraform {
  required_providers {
    aws = { source = "hashicorp/aws" }
  }
}

provider "aws" {
  region = "eu-west-1"
}

resource "aws_service_discovery_private_dns_namespace" "colors" {
  name = var.namespace
  vpc  = "vpc-0abc"
}

data "aws_lb" "front" {
  name = "colorapp-front"
}

module "observability" {
  source = "./modules/observability"
}

resource "aws_appmesh_mesh" "colorapp" {
  name = local.mesh_name

  spec {
    egress_filter {
      type = "DROP_ALL"
    }
    service_discovery {
      ip_preference = "IPv4_PREFERRED"
    }
  }

  tags = local.common_tags
}

# Blue: discovered through Cloud Map, TLS on its listener, full listener policy, access log.
resource "aws_appmesh_virtual_node" "blue" {
  name      = "colorteller-blue-${var.env}"
  mesh_name = aws_appmesh_mesh.colorapp.id

  spec {
    listener {
      port_mapping {
        port     = var.app_port
        protocol = "http"
      }

      health_check {
        protocol            = "http"
        path                = "/ping"
        healthy_threshold   = 2
        unhealthy_threshold = 3
        timeout_millis      = 2000
        interval_millis     = 5000
      }

      timeout {
        http {
          idle {
            unit  = "s"
            value = 60
          }
          per_request {
            unit  = "ms"
            value = 1500
          }
        }
      }

      outlier_detection {
        max_server_errors    = 5
        max_ejection_percent = 50
        interval {
          unit  = "s"
          value = 10
        }
        base_ejection_duration {
          unit  = "s"
          value = 30
        }
      }

      connection_pool {
        http {
          max_connections      = 100
          max_pending_requests = 25
        }
      }

      tls {
        mode = "STRICT"
        certificate {
          acm {
            certificate_arn = "arn:aws:acm:eu-west-1:111122223333:certificate/blue"
          }
        }
        validation {
          subject_alternative_names {
            match {
              exact = ["gateway.${var.namespace}"]
            }
          }
          trust {
            file {
              certificate_chain = "/etc/ssl/colors-ca.pem"
            }
          }
        }
      }
    }

    service_discovery {
      aws_cloud_map {
        namespace_name = var.namespace
        service_name   = "colorteller"
        attributes = {
          color = "blue"
          stage = var.env
        }
      }
    }

    logging {
      access_log {
        file {
          path = "/dev/stdout"
          format {
            json {
              key   = "start"
              value = "%START_TIME%"
            }
            json {
              key   = "status"
              value = "%RESPONSE_CODE%"
            }
          }
        }
      }
    }
  }
}

# Red: DNS discovery, a gRPC listener.
resource "aws_appmesh_virtual_node" "red" {
  name      = format("colorteller-%s-%s", "red", var.env)
  mesh_name = local.mesh_name

  spec {
    listener {
      port_mapping {
        port     = 9080
        protocol = "grpc"
      }
      health_check {
        protocol            = "grpc"
        healthy_threshold   = 2
        unhealthy_threshold = 2
        timeout_millis      = 2000
        interval_millis     = 5000
      }
      timeout {
        grpc {
          per_request {
            unit  = "s"
            value = 15
          }
        }
      }
    }

    service_discovery {
      dns {
        hostname      = "red.${var.namespace}"
        response_type = "ENDPOINTS"
        ip_preference = "IPv4_ONLY"
      }
    }
  }

  mesh_owner = "111122223333"
}

# The gateway-facing front node: calls the colour service through the mesh with client TLS.
resource "aws_appmesh_virtual_node" "front" {
  name      = "front-${var.env}"
  mesh_name = aws_appmesh_mesh.colorapp.name

  spec {
    backend {
      virtual_service {
        virtual_service_name = aws_appmesh_virtual_service.colorteller.name
        client_policy {
          tls {
            enforce = true
            ports   = [8080]
            validation {
              trust {
                acm {
                  certificate_authority_arns = ["arn:aws:acm-pca:eu-west-1:111122223333:certificate-authority/colors"]
                }
              }
            }
          }
        }
      }
    }
    backend {
      virtual_service {
        virtual_service_name = aws_appmesh_virtual_service.red.name
      }
    }

    listener {
      port_mapping {
        port     = 80
        protocol = "http"
      }
    }

    service_discovery {
      dns {
        hostname = data.aws_lb.front.dns_name
      }
    }
  }
}

resource "aws_appmesh_virtual_router" "colorteller" {
  name      = "colorteller-router"
  mesh_name = aws_appmesh_mesh.colorapp.id

  spec {
    listener {
      port_mapping {
        port     = var.app_port
        protocol = "http"
      }
    }
  }
}

resource "aws_appmesh_route" "colors" {
  name                = "colors"
  mesh_name           = aws_appmesh_mesh.colorapp.id
  virtual_router_name = aws_appmesh_virtual_router.colorteller.name

  spec {
    priority = 10

    http_route {
      match {
        prefix = "/"
        method = "GET"
        header {
          name = "x-color"
          match {
            exact = "blue"
          }
        }
        header {
          name   = "x-canary"
          invert = true
          match {
            range {
              start = 1
              end   = 5
            }
          }
        }
        query_parameter {
          name = "debug"
          match {
            exact = "1"
          }
        }
      }

      action {
        weighted_target {
          virtual_node = aws_appmesh_virtual_node.blue.name
          weight       = 3
        }
        weighted_target {
          virtual_node = aws_appmesh_virtual_node.red.name
          weight       = var.red_weight
        }
      }

      retry_policy {
        max_retries       = 2
        http_retry_events = ["server-error", "gateway-error"]
        tcp_retry_events  = ["connection-error"]
        per_retry_timeout {
          unit  = "ms"
          value = 500
        }
      }

      timeout {
        per_request {
          unit  = "s"
          value = 5
        }
      }
    }
  }
}

resource "aws_appmesh_route" "colors_grpc" {
  name                = "colors-grpc"
  mesh_name           = aws_appmesh_mesh.colorapp.id
  virtual_router_name = aws_appmesh_virtual_router.colorteller.name

  spec {
    grpc_route {
      match {
        service_name = "color.ColorService"
        method_name  = "GetColor"
        metadata {
          name = "x-tenant"
          match {
            prefix = "acme"
          }
        }
      }

      action {
        weighted_target {
          virtual_node = aws_appmesh_virtual_node.red.name
          weight       = 1
        }
      }

      retry_policy {
        max_retries       = 3
        grpc_retry_events = ["unavailable", "deadline-exceeded"]
        per_retry_timeout {
          unit  = "s"
          value = 2
        }
      }
    }
  }
}

resource "aws_appmesh_virtual_service" "colorteller" {
  name      = local.color_host
  mesh_name = aws_appmesh_mesh.colorapp.id

  spec {
    provider {
      virtual_router {
        virtual_router_name = aws_appmesh_virtual_router.colorteller.name
      }
    }
  }
}

resource "aws_appmesh_virtual_service" "red" {
  name      = "red.${var.namespace}"
  mesh_name = aws_appmesh_mesh.colorapp.id

  spec {
    provider {
      virtual_node {
        virtual_node_name = aws_appmesh_virtual_node.red.name
      }
    }
  }
}

resource "aws_appmesh_virtual_gateway" "ingress" {
  name      = local.gateway
  mesh_name = aws_appmesh_mesh.colorapp.id

  spec {
    listener {
      port_mapping {
        port     = 8443
        protocol = "http"
      }

      health_check {
        protocol            = "http"
        path                = "/healthz"
        healthy_threshold   = 2
        unhealthy_threshold = 2
        timeout_millis      = 2000
        interval_millis     = 5000
      }

      tls {
        mode = "STRICT"
        certificate {
          acm {
            certificate_arn = var.gateway_cert_arn
          }
        }
      }
    }

    logging {
      access_log {
        file {
          path = "/dev/stdout"
          format {
            text = "[%START_TIME%] %REQ(:METHOD)% %RESPONSE_CODE%\n"
          }
        }
      }
    }
  }

  tags = { exposure = "public" }
}

resource "aws_appmesh_gateway_route" "colors" {
  name                 = "colors-${lower("EDGE")}"
  mesh_name            = aws_appmesh_mesh.colorapp.id
  virtual_gateway_name = aws_appmesh_virtual_gateway.ingress.name

  spec {
    http_route {
      match {
        prefix = "/color/"
      }

      action {
        target {
          virtual_service {
            virtual_service_name = aws_appmesh_virtual_service.colorteller.name
          }
        }
        rewrite {
          prefix {
            value = "/"
          }
          hostname {
            default_target_hostname = "DISABLED"
          }
        }
      }
    }
  }
}

# A node per extra colour: for_each is not expanded offline, and the names depend on each.key.
resource "aws_appmesh_virtual_node" "extra" {
  for_each  = toset(["green", "yellow"])
  name      = "colorteller-${each.key}"
  mesh_name = aws_appmesh_mesh.colorapp.id
}
