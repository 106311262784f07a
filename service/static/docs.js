// The /docs page: Swagger UI over the service's own contract, started by this file (the page's
// Content-Security-Policy allows scripts from the service only, none inline).
"use strict";

(function () {
  var root = document.getElementById("swagger-ui");
  var query = new URLSearchParams(window.location.search);
  // Two views a link can ask for, and nothing else (Swagger UI's own queryConfigEnabled would also
  // let a link load another document): ?expand=full opens every operation, ?view=schema shows
  // request and response schemas before their examples.
  var expand = ["list", "full", "none"].indexOf(query.get("expand")) >= 0 ? query.get("expand") : "list";
  var rendering = query.get("view") === "schema" ? "model" : "example";

  // The swagger-ui-bundle wheel ships Swagger UI 4, which renders OpenAPI 3.0 documents only and
  // refuses the contract's "openapi: 3.1.0". Read as 3.0 it renders every path, body and example;
  // only a 3.1 type list such as [string, "null"] shows its types run together ("stringnull").
  var spec = new URL(root.dataset.spec, window.location.href).href;
  function asOpenApi30(response) {
    if (response.url === spec && typeof response.text === "string") {
      response.text = response.text.replace(/^openapi: 3\.1\.\d+$/m, "openapi: 3.0.3");
    }
    return response;
  }

  window.ui = SwaggerUIBundle({
    url: spec,
    dom_id: "#swagger-ui",
    deepLinking: true,
    docExpansion: expand,
    defaultModelRendering: rendering,
    defaultModelExpandDepth: 2,
    displayRequestDuration: true,
    validatorUrl: null,
    responseInterceptor: asOpenApi30,
  });
})();
